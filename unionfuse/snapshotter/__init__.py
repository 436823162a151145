"""containerd snapshotter (proxy plugin) backed by unionfuse mounts."""
