"""OCI interop: image archives (docker-archive, OCI layout) and the distribution API.

- ``local``: what the store needs for images that travel: config bytes kept exactly,
  verified layer import (gzip/zstd), exact layer tars back out (tar-split recipes),
  and which compressed blobs a layer is known as on which registry.
- ``archive``: ``save`` / ``load``.
- ``registry``: ``pull`` / ``push`` over the OCI distribution API.
- ``cli``: the four commands' parsers and dispatch.
"""
