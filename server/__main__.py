"""`python -m server`: Triton + the HTTP gateway (see server/launcher.py)."""
import sys

from server.launcher import main

sys.exit(main())
