#!/usr/bin/env bash
# Start or stop a project-owned Orthanc on loopback (DICOMweb on, no remote access, no DICOM port).
#   scripts/orthanc/orthanc.sh start   # idempotent; waits until /dicom-web answers
#   scripts/orthanc/orthanc.sh stop    # stops the instance this script started (pid file)
# ORTHANC_HOME (default: .orthanc in the project, git-ignored) holds the config, storage, log and pid.
# ORTHANC_PORT (default 8042). Orthanc comes from Debian: apt-get install orthanc orthanc-dicomweb.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
HOME_DIR="${ORTHANC_HOME:-$ROOT/.orthanc}"
PORT="${ORTHANC_PORT:-8042}"
PLUGIN="${ORTHANC_DICOMWEB_PLUGIN:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}"
PID_FILE="$HOME_DIR/orthanc.pid"
URL="http://127.0.0.1:$PORT"

running() { [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; }

start() {
  command -v Orthanc >/dev/null || { echo "Orthanc is not installed: apt-get install -y orthanc orthanc-dicomweb" >&2; exit 1; }
  [[ -f "$PLUGIN" ]] || { echo "DICOMweb plugin missing ($PLUGIN): apt-get install -y orthanc-dicomweb" >&2; exit 1; }
  if running; then echo "Orthanc already running (pid $(cat "$PID_FILE")) at $URL"; return; fi
  mkdir -p "$HOME_DIR/storage"
  sed -e "s#@STORAGE@#$HOME_DIR/storage#g" -e "s#@PLUGINS@#$PLUGIN#" -e "s#@HTTP_PORT@#$PORT#" \
    "$HERE/orthanc.json.in" > "$HOME_DIR/orthanc.json"
  Orthanc "$HOME_DIR/orthanc.json" > "$HOME_DIR/orthanc.log" 2>&1 &
  echo $! > "$PID_FILE"
  for _ in $(seq 1 100); do
    if curl -sf "$URL/dicom-web/studies" >/dev/null; then echo "Orthanc up at $URL/dicom-web (pid $(cat "$PID_FILE"))"; return; fi
    running || { tail -20 "$HOME_DIR/orthanc.log" >&2; echo "Orthanc exited" >&2; exit 1; }
    sleep 0.2
  done
  echo "Orthanc did not answer at $URL within 20s" >&2; exit 1
}

stop() {
  if ! running; then echo "Orthanc not running"; rm -f "$PID_FILE"; return; fi
  local pid; pid="$(cat "$PID_FILE")"
  kill "$pid"
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then echo "Orthanc $pid did not stop; killing" >&2; kill -9 "$pid"; fi
  rm -f "$PID_FILE"
  echo "Orthanc stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
