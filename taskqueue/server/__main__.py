import sys

from taskqueue.server.cli import legacy_main

legacy_main(sys.argv[1:])
