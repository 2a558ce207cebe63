"""Reply text reaches the screen in batches, and nothing waits for the next token."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import Markdown

from tests.tui.conftest import wait_until
from tui.widgets.stream_batch import BatchedStream, TypingClock


class _OneMarkdown(App[None]):
    def compose(self) -> ComposeResult:
        yield Markdown()


async def test_writes_inside_the_interval_are_batched_and_a_lone_write_still_shows() -> None:
    app = _OneMarkdown()
    async with app.run_test():
        markdown = app.query_one(Markdown)
        stream = BatchedStream(Markdown.get_stream(markdown), interval=0.05)
        await stream.write("first ")  # the first write goes out at once
        await wait_until(lambda: markdown.source == "first ")
        for word in ("a ", "b ", "c"):
            await stream.write(word)
        # Held back until the interval ends, then written together, with no
        # further write to trigger it.
        await wait_until(lambda: markdown.source == "first a b c", within=5)
        await stream.write(" end")
        await stream.stop()
        assert markdown.source == "first a b c end"


async def test_typing_holds_reply_text_back_until_the_keyboard_is_quiet() -> None:
    app = _OneMarkdown()
    async with app.run_test():
        markdown = app.query_one(Markdown)
        typing = TypingClock()
        stream = BatchedStream(Markdown.get_stream(markdown), interval=0.01, typing=typing)
        typing.mark()
        await stream.write("held")
        assert markdown.source == ""  # a key was just typed: no frame for the reply yet
        await wait_until(lambda: markdown.source == "held", within=5)
        await stream.stop()
