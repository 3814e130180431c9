"""The ACE diffusion transformer and its parts.

``ace.models.ACETransformer`` is imported lazily, so that ``ace.packing`` can use
``ace.models.attention`` and ``ace.models.rope`` without an import cycle.
"""

__all__ = ["PRESETS", "ACETransformer"]


def __getattr__(name: str):
    if name in __all__:
        from ace.models import transformer

        return getattr(transformer, name)
    raise AttributeError(f"module 'ace.models' has no attribute {name!r}")
