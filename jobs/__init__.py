"""Entry points. Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is imported; with it set to 0 an
embedded local Ray binds 127.0.0.1 instead of resolving the machine's external interface, so it is set
here, before any job module imports Ray."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
