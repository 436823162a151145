#!/bin/sh
cat /etc/motd
echo "$GREETING from $(id -un) in $(pwd) ($(cat /app/build-info))"
