#!/bin/sh
# Installs StemeDB on one node: users and group, directories with their
# owners and modes, config files from the examples (an existing config is
# never overwritten), binaries, systemd units and the operations docs.
#
# Idempotent: a second run changes nothing (files are compared before they
# are copied, users and directories are only created when missing).
#
# Usage (as root, from a checkout with built binaries):
#   cargo build --release --bins && sudo deploy/install.sh
#
# Environment:
#   DESTDIR   install into this throwaway root instead of /. It must hold
#             etc/passwd, etc/group, etc/shadow and etc/gshadow; users are
#             added there (useradd --prefix), never on the host, and
#             systemctl is not called.
#   PREFIX    where binaries and docs go (default /usr/local); the units'
#             ExecStart= paths follow it.
#   BIN_SRC   the directory holding walld, stemed and stemectl (default:
#             target/release of this checkout, else target/debug).
#
# After a first install on a real host:
#   systemctl enable --now stemedb-walld.socket stemedb-api.service
#   systemctl enable --now stemedb-backup.timer stemedb-wal-archive.timer stemedb-verify.timer
set -eu

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
if [ -z "${BIN_SRC:-}" ]; then
    if [ -x "$repo/target/release/stemed" ]; then
        BIN_SRC=$repo/target/release
    else
        BIN_SRC=$repo/target/debug
    fi
fi

say() { printf 'install.sh: %s\n' "$*"; }
die() { say "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (it creates users and chowns directories)"
for b in walld stemed stemectl; do
    [ -x "$BIN_SRC/$b" ] || die "$BIN_SRC/$b is missing: build it first (cargo build --release --bins) or set BIN_SRC"
done
if [ -n "$DESTDIR" ]; then
    for f in passwd group shadow gshadow; do
        [ -f "$DESTDIR/etc/$f" ] || die "DESTDIR=$DESTDIR has no etc/$f (seed it with at least the root entries)"
    done
fi

# --- users and group ------------------------------------------------------
# stemedb:      runs stemed and the backup/verify jobs; its group may use
#               walld's socket.
# stemedb-wal:  runs walld and owns the WAL disk; nothing else writes there.
prefix_opt() { if [ -n "$DESTDIR" ]; then printf -- '--prefix\n%s\n' "$DESTDIR"; fi; }
entry() { # entry passwd|group NAME -> the line, from DESTDIR or the host
    if [ -n "$DESTDIR" ]; then
        awk -F: -v n="$2" '$1 == n' "$DESTDIR/etc/$1"
    else
        getent "$1" "$2" || true
    fi
}
id_of() { entry "$1" "$2" | cut -d: -f3; }

add_group() {
    if [ -z "$(entry group "$1")" ]; then
        # shellcheck disable=SC2046
        groupadd $(prefix_opt) --system "$1"
        say "created group $1"
    fi
}
add_user() { # add_user NAME GROUP HOME
    if [ -z "$(entry passwd "$1")" ]; then
        # shellcheck disable=SC2046
        useradd $(prefix_opt) --system --gid "$2" --no-create-home \
            --home-dir "$3" --shell /usr/sbin/nologin --comment "StemeDB ($1)" "$1"
        say "created user $1"
    fi
}
add_group stemedb
add_group stemedb-wal
add_user stemedb stemedb /var/lib/stemedb/data
add_user stemedb-wal stemedb-wal /var/lib/stemedb/wal

uid_db=$(id_of passwd stemedb)
gid_db=$(id_of group stemedb)
uid_wal=$(id_of passwd stemedb-wal)
gid_wal=$(id_of group stemedb-wal)
[ -n "$uid_db" ] && [ -n "$gid_db" ] && [ -n "$uid_wal" ] && [ -n "$gid_wal" ] ||
    die "cannot resolve the ids of stemedb and stemedb-wal"

# --- directories ----------------------------------------------------------
# dir PATH UID GID MODE: created when missing; owner and mode set only when
# they differ, so a second run touches nothing.
dir() {
    p=$DESTDIR$1
    if [ ! -d "$p" ]; then
        mkdir -p "$p"
        say "created $1"
    fi
    [ "$(stat -c %u:%g "$p")" = "$2:$3" ] || chown "$2:$3" "$p"
    [ "$(stat -c %a "$p")" = "$4" ] || chmod "$4" "$p"
}
# Both daemons read their own file here (walld as stemedb-wal, stemed as
# stemedb), so the directory is open and each file carries its own group.
dir /etc/stemedb 0 0 755
dir /var/lib/stemedb 0 0 755
# The dedicated WAL disk's mount point (mount it before the first start).
dir /var/lib/stemedb/wal "$uid_wal" "$gid_wal" 750
dir /var/lib/stemedb/data "$uid_db" "$gid_db" 750
# Entered by the backup jobs of both users; each subdirectory is closed.
dir /var/backups/stemedb 0 0 755
dir /var/backups/stemedb/snapshots "$uid_db" "$gid_db" 750
# setgid: archived segments are readable by the verify job (group stemedb).
dir /var/backups/stemedb/wal "$uid_wal" "$gid_db" 2750
# System directories: created when missing, never re-owned.
sysdir() {
    if [ ! -d "$DESTDIR$1" ]; then
        mkdir -p -m 755 "$DESTDIR$1"
        say "created $1"
    fi
}
sysdir "$PREFIX/bin"
sysdir /etc/systemd/system
sysdir "$PREFIX/share/doc/stemedb/operations"

# --- files ----------------------------------------------------------------
# put SRC DEST UID GID MODE: copies only when the content, owner or mode
# differ (install -C).
put() {
    if ! cmp -s "$1" "$DESTDIR$2" 2>/dev/null ||
        [ "$(stat -c %u:%g:%a "$DESTDIR$2")" != "$3:$4:$5" ]; then
        install -C -o "$3" -g "$4" -m "$5" "$1" "$DESTDIR$2"
        say "installed $2"
    fi
}
# config FILE UID GID: from the example, only if the node has none yet.
config() {
    dest=/etc/stemedb/$1
    if [ -e "$DESTDIR$dest" ]; then
        return
    fi
    tmp=$(mktemp)
    sed "s/^allowed_gids = \[\]/allowed_gids = [$gid_db]/" "$here/config/$1" >"$tmp"
    install -o "$2" -g "$3" -m 640 "$tmp" "$DESTDIR$dest"
    rm -f "$tmp"
    say "installed $dest from the example"
}
# walld reads its config as stemedb-wal, stemed as stemedb.
config walld.toml 0 "$gid_wal"
config api.toml 0 "$gid_db"

for b in walld stemed stemectl; do
    put "$BIN_SRC/$b" "$PREFIX/bin/$b" 0 0 755
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in "$here"/systemd/*.service "$here"/systemd/*.socket "$here"/systemd/*.timer; do
    name=$(basename "$unit")
    sed "s#/usr/local/#$PREFIX/#g" "$unit" >"$tmp/$name"
    put "$tmp/$name" "/etc/systemd/system/$name" 0 0 644
done
for doc in "$repo"/docs/operations/*.md; do
    [ -f "$doc" ] || continue
    put "$doc" "$PREFIX/share/doc/stemedb/operations/$(basename "$doc")" 0 0 644
done

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
say "done"
