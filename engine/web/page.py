"""memchat's own pages: no request leaves the server (no web fonts), the app focused on load."""

from __future__ import annotations

from html import escape

# Everything the page loads comes from this server: textual-serve's terminal
# script and stylesheet and its bundled Roboto Mono.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "font-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

_STYLE = """
@font-face { font-family: "Roboto Mono"; font-weight: 100 700;
  src: url("/static/fonts/RobotoMono-VariableFont_wght.ttf") format("truetype"); }
@font-face { font-family: "Roboto Mono"; font-style: italic; font-weight: 100 700;
  src: url("/static/fonts/RobotoMono-Italic-VariableFont_wght.ttf") format("truetype"); }
html, body { margin: 0; padding: 0; background: #0c181f; color: #e8e8e8;
  font-family: "Roboto Mono", monospace; }
.textual-terminal { width: 100vw; height: 100vh; }
.note { max-width: 40em; margin: 20vh auto; line-height: 1.5; }
.closed { display: none; position: fixed; inset: 0; background: #0c181fee; }
body.-closed .closed { display: block; }
"""

# textual.js connects on window.onload; the terminal's textarea is where
# keys go, so it gets focus as soon as it exists (the app started unfocused).
_FOCUS = """
// The terminal measures its cells when textual.js builds it on load: with
// the bundled font not loaded yet, the rows came out too many and the last
// one (the app's key bar) fell below the window. Build it once the font is in.
const buildTerminal = window.onload;
window.onload = (event) => {
  document.fonts.load('16px "Roboto Mono"').finally(() => buildTerminal(event));
};
window.addEventListener("load", () => {
  const started = Date.now();
  const tick = () => {
    const input = document.querySelector(".xterm-helper-textarea");
    if (input && document.body.classList.contains("-loaded")) { input.focus(); return; }
    if (Date.now() - started < 20000) setTimeout(tick, 50);
  };
  tick();
});
"""


def _page(title: str, body: str, head: str = "") -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name="referrer" content="no-referrer">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style>{head}</head>"
        f"<body>{body}</body></html>\n"
    )


def app_page(label: str) -> str:
    head = (
        '<link rel="stylesheet" href="/static/css/xterm.css">'
        '<script src="/static/js/textual.js"></script>'
        f"<script>{_FOCUS}</script>"
    )
    body = (
        '<div id="terminal" class="textual-terminal" '
        'data-session-websocket-url="" data-font-size="16"></div>'
        '<div class="closed"><p class="note">This memchat session ended. '
        '<a href="/" style="color:#8fd">Open it again</a></p></div>'
        # textual.js wants an absolute ws:// URL: built from where the page came from.
        "<script>document.getElementById('terminal').dataset.sessionWebsocketUrl ="
        " (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws';"
        "</script>"
    )
    return _page(f"memchat · {label}", body, head)


def entering_page() -> str:
    """After a link: go to the app, dropping the token from the address bar and history.

    A same-site navigation (not a redirect) so the SameSite=Strict cookie
    set here goes with it even when the link was opened from another site.
    """
    return _page(
        "memchat",
        '<p class="note">Opening memchat… <a href="/" style="color:#8fd">continue</a></p>'
        "<script>location.replace('/');</script>",
    )


def note_page(title: str, text: str) -> str:
    return _page(title, f'<p class="note">{escape(text)}</p>')
