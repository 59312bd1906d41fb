#!/usr/bin/env bash
# A writable disk for the sh plugin's tests: a private copy of an image, kept in $tmpdir.
#
#   pynbd serve sh tests/data/sh/disk.sh IMAGE        (the same under nbdkit sh)
#
# Every method of nbdkit's shell convention that a disk needs, with the exit statuses:
# 0 success or true, 1 error (an errno name may start stderr), 2 missing, 3 false.

disk=$tmpdir/disk

case "$1" in
    magic_config_key) echo file ;;
    config)
        case "$2" in
            file) cp -- "$3" "$disk" || exit 1 ;;
            *) echo "EINVAL unknown parameter $2" >&2; exit 1 ;;
        esac ;;
    config_complete)
        if [ ! -f "$disk" ]; then echo "file parameter missing" >&2; exit 1; fi ;;
    thread_model) echo serialize_requests ;;
    dump_plugin) echo "disk_sh=1" ;;
    open) mktemp -d "$tmpdir/handle-XXXXXX" ;;
    close) rm -rf -- "$2" ;;
    get_size) stat -L -c %s "$disk" ;;
    export_description) echo "a copy of an image" ;;
    pread) dd if="$disk" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
    can_write|can_flush|can_trim|can_zero|can_extents) exit 0 ;;
    can_fua) echo native ;;
    can_cache) echo emulate ;;
    pwrite) dd of="$disk" seek="$4" conv=notrunc oflag=seek_bytes status=none ;;
    flush) sync -- "$disk" ;;
    trim|zero)
        dd if=/dev/zero of="$disk" seek="$4" count="$3" conv=notrunc \
           oflag=seek_bytes iflag=count_bytes status=none ;;
    extents)
        # The first half of each request is data, the rest reads as zeroes.
        half=$(( $3 / 2 ))
        echo "$4 $half"
        echo "$(( $4 + half )) $(( $3 - half )) zero" ;;
    *) exit 2 ;;
esac
