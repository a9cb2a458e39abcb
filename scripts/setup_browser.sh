#!/usr/bin/env bash
# Installs what the browser test needs (idempotent; quick when everything is there): Debian's chromium and
# Node.js from apt (as root, after apt-get update), and puppeteer-core pinned in tests/browser/package-lock.json
# from npm into tests/browser/node_modules (git-ignored). Playwright's own browser download does not work here.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup_browser: install ${missing[*]} (Debian: apt-get install ${missing[*]}) or run as root" >&2
        exit 1
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
cd "$REPO/tests/browser"
if [ ! -f node_modules/puppeteer-core/package.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund
fi
echo "browser ready: $(command -v chromium), node $(node --version), puppeteer-core $(node -p "require('puppeteer-core/package.json').version")"
