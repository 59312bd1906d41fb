#!/usr/bin/env bash
# Make the pictures of docs/view.md (run as root: it loop-mounts the new file system).
#   docs/view/make-pictures.sh [OUTDIR]      (default: docs/view)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$(realpath "${1:-$here}")"
work="$(mktemp -d /tmp/view-pictures-XXXXXX)"
trap 'fusermount3 -u "$work/mnt" 2>/dev/null || true; kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"

wait_for() { for _ in $(seq 100); do [[ -e "$1" ]] && return 0; sleep 0.1; done; return 1; }

# 1. mkfs.ext4 and a file copy on a 64 MiB export, through pynbd fuse and a loop device.
pynbd serve -f -U nbd.sock --filter=view memory 64M view-socket=v.sock & server=$!
wait_for v.sock
pynbd view v.sock --record mkfs.jsonl --snapshot /dev/null 2>viewer.err & viewer=$!
until grep -q watching viewer.err; do sleep 0.1; done
mkdir mnt fs
pynbd fuse mnt "nbd+unix:///?socket=$work/nbd.sock" & fuse=$!
wait_for mnt/nbd
mkfs.ext4 -q -F mnt/nbd
loop="$(losetup -f --show mnt/nbd)"
mount "$loop" fs
cp -r "$here/../../src" fs/
dd if=/dev/urandom of=fs/random.bin bs=1M count=8 status=none
sync
umount fs
losetup -d "$loop"
fusermount3 -u mnt
wait $fuse || true
kill $server; wait $server || true
wait $viewer
pynbd view --replay mkfs.jsonl --snapshot "$out/mkfs.png" --fade 0 --cell 3
pynbd view --replay mkfs.jsonl --apng "$out/mkfs-anim.png" --frames 40 --fade 0.3 --cell 3

# 2. A RAID 5 over five 4 MiB exports (docs/view/raid5.py: md's layout, done by hand).
socks=()
for i in 1 2 3 4 5; do
    pynbd serve -f -U "d$i.sock" --filter=view memory 4M "view-socket=v$i.sock" &
    socks+=("v$i.sock")
done
for i in 1 2 3 4 5; do wait_for "v$i.sock"; wait_for "d$i.sock"; done
pynbd view "${socks[@]}" --record raid5.jsonl --snapshot /dev/null 2>viewer.err & viewer=$!
until [[ "$(grep -c watching viewer.err)" == 5 ]]; do sleep 0.1; done
python3 "$here/raid5.py" d1.sock d2.sock d3.sock d4.sock d5.sock
for j in $(jobs -p); do [[ "$j" != "$viewer" ]] && kill "$j"; done
wait $viewer
pynbd view --replay raid5.jsonl --snapshot "$out/raid5.png" --fade 0 --columns 16 --cell 4
pynbd view --replay raid5.jsonl --apng "$out/raid5-anim.png" --frames 40 --fade 0.5 \
    --columns 16 --cell 4
# 3. The page itself, in headless chromium (needs playwright).
if python3 -c "import playwright" 2>/dev/null; then
    python3 "$here/page-shot.py" raid5.jsonl "$out/page.png" --fade 0 --zoom 4
fi
ls -l "$out"/*.png
