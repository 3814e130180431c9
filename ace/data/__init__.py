"""Data for ACE: the LCU dataset format (``manifest``) and the procedural toy world (``toy``)."""
