#!/bin/sh
# A 64K read-only disk whose reads fail in a different way at each 512-byte block: every
# exit status and stderr form of nbdkit's shell convention (see the table in the tests).
case "$1" in
    get_size) echo 64K ;;
    pread)
        case "$(( $4 / 512 ))" in
            0) echo "ENOSPC custom message" >&2; exit 1 ;;
            1) printf 'eperm' >&2; exit 1 ;;
            2) printf 'EPIPE' >&2; exit 1 ;;
            3) printf 'EINVALID foo' >&2; exit 1 ;;
            4) exit 1 ;;
            5) printf 'ESHUTDOWN line1\nline2\n' >&2; exit 1 ;;
            6) echo 'EROFS read-only' >&2; exit 1 ;;
            7) echo 'EDQUOT quota' >&2; exit 1 ;;
            8) echo 'EFBIG too big' >&2; exit 1 ;;
            9) echo 'ENOTSUP not supported' >&2; exit 1 ;;
            10) echo 'EOPNOTSUPP not supported' >&2; exit 1 ;;
            11) echo 'EOVERFLOW overflow' >&2; exit 1 ;;
            12) exit 3 ;;
            13) echo 'ENOMEM' >&2; exit 4 ;;
            14) echo 'EINVAL	tab' >&2; exit 1 ;;
            15) echo 'ENOSPC' >&2; exit 77 ;;
            16) echo 'EIO' >&2; exit 1 ;;
            17) echo 'ENOENT' >&2; exit 1 ;;
            18) echo 'Eio lower' >&2; exit 255 ;;
            19) exit 4 ;;
            20) echo 'ENOSPC before the signal' >&2; kill -9 $$ ;;
            21) echo 'EPERM stderr is ignored on success' >&2
                dd if=/dev/zero count="$3" iflag=count_bytes status=none ;;
            22) exit 2 ;;
            23) echo 'not the right amount' ;;
            *) dd if=/dev/zero count="$3" iflag=count_bytes status=none ;;
        esac ;;
    *) exit 2 ;;
esac
