#!/bin/sh
# The soak's --exec hook: the app reloading, i.e. loading the version the destination now holds.
# Usage: soak_hook.sh HANG_FLAG DEST LOADED_FILE
# While HANG_FLAG exists it hangs (infantry's --exec-timeout must kill it, with its sleep). Otherwise it
# writes the first line of DEST/k0 ("version <V>") to LOADED_FILE, replaced by rename so that the soak
# never reads half a line.
if [ -e "$1" ]; then
    sleep 1000
fi
line=$(head -n 1 "$2/k0") || exit 0
printf '%s\n' "$line" > "$3.tmp" && mv -f "$3.tmp" "$3"
