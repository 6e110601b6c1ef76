#!/bin/sh
# Render alertmanager.yml.tmpl with the receivers' secrets, read from files, then run Alertmanager on the result
# (arguments are passed on). The rendered file is written beside Alertmanager's data, never into the image or
# the repository.
#
#   SECRETS_DIR     where the secret files are (default /run/secrets): webhook_url (required), and for Telegram
#                   telegram_bot_token and telegram_chat_id (both, or neither: then no Telegram receiver)
#   TELEGRAM_API_URL  default https://api.telegram.org
#   CONFIG_OUT      the rendered file (default /alertmanager/alertmanager.yml)
#   ALERTMANAGER    the binary (default alertmanager; Debian's is prometheus-alertmanager)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
secrets=${SECRETS_DIR:-/run/secrets}
out=${CONFIG_OUT:-/alertmanager/alertmanager.yml}

secret() { [ -s "$secrets/$1" ] && tr -d '\r\n' < "$secrets/$1" || true; }
escaped() { printf '%s' "$1" | sed -e 's/[\\|&]/\\&/g' -e "s/'/''/g"; }  # for sed's replacement, in '…' YAML

webhook=$(secret webhook_url)
token=$(secret telegram_bot_token)
chat=$(secret telegram_chat_id)
[ -n "$webhook" ] || { echo "render.sh: no $secrets/webhook_url: alerts would reach no one" >&2; exit 1; }
case "$chat" in ''|-[0-9]*|[0-9]*) ;; *) echo "render.sh: telegram_chat_id must be a number" >&2; exit 1 ;; esac
if { [ -n "$token" ] && [ -z "$chat" ]; } || { [ -z "$token" ] && [ -n "$chat" ]; }; then
  echo "render.sh: set both telegram_bot_token and telegram_chat_id, or neither" >&2; exit 1
fi
drop=''
[ -n "$token" ] || drop='/# telegram-begin/,/# telegram-end/d'
mkdir -p "$(dirname "$out")"
(umask 077 && sed -e "${drop:-s/^\$//}" \
  -e "s|@WEBHOOK_URL@|$(escaped "$webhook")|g" \
  -e "s|@TELEGRAM_API_URL@|$(escaped "${TELEGRAM_API_URL:-https://api.telegram.org}")|g" \
  -e "s|@TELEGRAM_BOT_TOKEN@|$(escaped "$token")|g" \
  -e "s|@TELEGRAM_CHAT_ID@|${chat:-0}|g" \
  -e "s|@TEMPLATES_DIR@|$(escaped "$here")|g" \
  "$here/alertmanager.yml.tmpl" > "$out")
exec "${ALERTMANAGER:-alertmanager}" --config.file="$out" "$@"
