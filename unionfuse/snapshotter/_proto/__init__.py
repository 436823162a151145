"""Generated containerd snapshots API stubs (see scripts/gen-snapshotter-proto.sh)."""
