"""ImageGuard: lets only trusted container images run on an edge device."""

__version__ = "0.1.0"
APP_ID = "CONTAINER-AUTH-V1"
