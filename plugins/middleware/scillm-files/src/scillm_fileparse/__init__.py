"""File parsing for scillm-files, run in its worker processes (``python -m scillm_fileparse.worker``).

Kept apart from the ``scillm_files`` plugin package so that a worker imports only the standard library and pypdf,
never scillm_core: it starts in a fraction of a second and is cheap to kill and respawn.
"""
