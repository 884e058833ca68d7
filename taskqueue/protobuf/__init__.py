"""Generated protocol modules; regenerate with ``python scripts/genproto.py``."""
