"""Runs localstripe (PyPI, GPL; installed by scripts/localstripe.sh, never vendored)
for tests and the demo: on 127.0.0.1 only, state in memory only (the stock command
binds all interfaces and pickles its store to /tmp/localstripe.pickle).

Usage: python localstripe_server.py PORT
"""
import sys

from aiohttp import web
from localstripe import resources, server

# Keep state in memory: no shared pickle file between runs or parallel servers.
resources.Store.dump_to_disk = lambda self: None
resources.Store.try_load_from_disk = lambda self: None

if __name__ == "__main__":
    port = int(sys.argv[1])
    web.run_app(server.app, host="127.0.0.1", port=port, access_log=None, print=None)
