"""The Dockerfile builder: ``unionfuse build``.

- :mod:`.parse`    the `dockerfile` package's parse (the official Go parser) + validation
- :mod:`.lex`      Dockerfile variable substitution (buildkit's shell lexer rules)
- :mod:`.context`  the build context: .dockerignore, source lookup, content hashes
- :mod:`.fsops`    symlink-safe path resolution and copying inside an image root
- :mod:`.cache`    the build cache (ROOT/build-cache/)
- :mod:`.executor` runs the steps: RUN in a container, COPY/ADD through a union mount
- :mod:`.progress` classic ``Step N/M`` output, a tty view, quiet mode
- :mod:`.cli`      ``add_parser`` / ``cmd_build``
"""
