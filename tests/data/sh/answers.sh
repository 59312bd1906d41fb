#!/bin/sh
# A script whose answers the test states: method M runs the shell code in the file
# $SH_ANSWERS/M if there is one, else in the environment variable SH_M; a method with
# neither is missing (exit 2). For example:
#
#   SH_get_size='echo 1M' SH_pread='echo EIO no >&2; exit 1' pynbd serve sh answers.sh
case "$1" in
    "" | *[!a-z_]*) exit 2 ;;
esac
if [ -n "${SH_ANSWERS-}" ] && [ -f "$SH_ANSWERS/$1" ]; then
    . "$SH_ANSWERS/$1"
    exit
fi
eval "code=\${SH_$1-exit 2}"
eval "$code"
