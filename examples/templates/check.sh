#!/bin/sh
# infantry's --check gate for this example: would nginx accept the staged set?
#
#   check: "sh /path/to/check.sh"      infantry appends the staged directory: check.sh STAGED_DIR
#
# It writes a throw-away nginx.conf whose http block includes the staged *.conf files, as the real
# nginx.conf includes the published ones, and runs `nginx -t` on it. A non-zero exit refuses the set,
# and nginx's own message (on stderr) is what infantry logs. The staged directory is only read.
set -eu
staged=${1:?usage: check.sh STAGED_DIR}
PATH="$PATH:/usr/sbin:/sbin"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/infantry-nginx-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/nginx.conf" <<CONF
pid "$tmp/nginx.pid";
error_log stderr;
events { worker_connections 16; }
http {
    client_body_temp_path "$tmp/body";
    proxy_temp_path "$tmp/proxy";
    fastcgi_temp_path "$tmp/fastcgi";
    uwsgi_temp_path "$tmp/uwsgi";
    scgi_temp_path "$tmp/scgi";
    include "$staged/*.conf";
}
CONF
if nginx -t -q -p "$tmp" -e stderr -c "$tmp/nginx.conf" 2>"$tmp/stderr"; then
    exit 0
fi
# nginx ends with "configuration file ... test failed"; infantry shows a check's last line of stderr, so
# that line goes and nginx's reason (without its timestamp and pid) comes last.
grep -v ' test failed$' "$tmp/stderr" | sed 's/^[0-9/]* [0-9:]* \[\([a-z]*\)\] [0-9#]*: /nginx: [\1] /' >&2
exit 1
