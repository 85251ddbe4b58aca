"""The chat page (Gradio 6): `qwenvl web` serves it alone, `qwenvl serve --ui` mounts it at /ui beside the API.

The conversation itself lives in `web_chat.py`; this file is only the page. Every visitor's answers stream
from the one engine, which batches them (no Gradio concurrency limit). Pictures come in through an upload
button, as in the original `web_demo_mm.py`: Gradio 6's multimodal textbox keeps removed files in the
browser and sends them again with the next upload.
"""
from __future__ import annotations

import hmac
import os
import tempfile
from importlib import resources

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before the import: no telemetry, no version check

import gradio as gr  # noqa: E402
from fastapi import FastAPI  # noqa: E402

from ..engine import LLMEngine  # noqa: E402
from ..errors import QwenVLError  # noqa: E402
from .media import MediaPolicy  # noqa: E402
from .openai_api import engine_lifespan  # noqa: E402
from .web_chat import Conversation, Settings, refusal, shown  # noqa: E402

EXAMPLE_PICTURE = str(resources.files("qwenvl.serve") / "web_examples" / "shapes.png")
EXAMPLE_PROMPTS = ["Describe the picture.", "Output the bounding box of the red circle.",
                   "How many shapes are there?", "What colour is the triangle?"]


class WebPage:
    def __init__(self, engine: LLMEngine, tokenizer, model_name: str, media: MediaPolicy | None = None,
                 max_images: int = 8):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.media, self.max_images = media or MediaPolicy(), max_images
        self.folder = tempfile.mkdtemp(prefix="qwenvl-web-")  # drawings; each is deleted with its turn
        self.blocks = self.build()

    def conversation(self, conv: Conversation | None) -> Conversation:
        return conv if conv is not None else Conversation(self.engine, self.tokenizer, self.media, self.max_images,
                                                          self.folder)

    @staticmethod
    def history(conv: Conversation, streaming: bool = False) -> list[dict]:
        """The chatbot's messages: each picture, question, answer (markup removed) and drawing."""
        out = []
        for i, t in enumerate(conv.turns):
            out += [{"role": "user", "content": {"path": u.path}} for u in t.pictures]
            out.append({"role": "user", "content": t.question})
            last = i == len(conv.turns) - 1
            if t.answer or (last and streaming):
                out.append({"role": "assistant", "content": shown(t.answer, final=not (last and streaming))})
            if t.drawing:
                out.append({"role": "assistant", "content": {"path": t.drawing}})
        return out + [{"role": "user", "content": {"path": u.path}} for u in conv.waiting]

    # ---- handlers ----------------------------------------------------------------------------------

    def upload(self, conv, files):
        conv = self.conversation(conv)
        for path in files or []:
            try:
                conv.add_picture(path, os.path.basename(path))
            except QwenVLError as e:  # shown on the page; the conversation goes on without the file
                gr.Warning(refusal(e))
        return conv, self.history(conv)

    def add_example(self, conv):
        conv = self.conversation(conv)
        try:
            conv.add_picture(EXAMPLE_PICTURE)
        except QwenVLError as e:
            gr.Warning(refusal(e))
        return conv, self.history(conv)

    def ask(self, conv, question):
        conv = self.conversation(conv)
        try:
            conv.ask(question or "")
        except QwenVLError as e:
            raise gr.Error(refusal(e)) from None
        locked = gr.update(interactive=False)  # one question at a time in a page; others' pages go on
        return conv, self.history(conv, streaming=True), gr.update(value="", interactive=False), locked

    async def answer(self, conv, system, temperature, top_p, max_new_tokens, seed):
        """Streams the last question's answer; a refusal (a bad seed, a conversation too long) takes the turn
        back and puts its question in the box again."""
        unlocked = gr.update(interactive=True)
        if conv is None or not conv.pending:
            yield conv, self.history(conv) if conv else [], unlocked, unlocked
            return
        settings = Settings(system or "", float(temperature), float(top_p), int(max_new_tokens), seed)
        try:
            async for _ in conv.answer_stream(settings):
                yield conv, self.history(conv, streaming=True), gr.update(), gr.update()
        except QwenVLError as e:
            gr.Warning(refusal(e))
            yield conv, self.history(conv), gr.update(value=conv.undo(), interactive=True), unlocked
            return
        yield conv, self.history(conv), unlocked, unlocked

    def regenerate(self, conv):
        conv = self.conversation(conv)
        if conv.turns:
            conv.turns[-1].answered = False
        locked = gr.update(interactive=not conv.pending)
        return conv, self.history(conv, streaming=conv.pending), locked, locked

    def undo(self, conv):
        conv = self.conversation(conv)
        question = conv.undo()
        box = gr.update(interactive=True) if question is None else gr.update(value=question, interactive=True)
        return conv, self.history(conv), box, gr.update(interactive=True)

    def clear(self, conv):
        conv = self.conversation(conv)
        conv.clear()
        return conv, [], gr.update(value="", interactive=True), gr.update(interactive=True)

    # ---- the page ----------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        config = self.engine.model.generation_config
        with gr.Blocks(title=f"qwenvl: {self.model_name}", analytics_enabled=False) as blocks:
            gr.Markdown(f"## qwenvl chat: `{self.model_name}`\nUpload pictures, then ask about them. Boxes in an "
                        "answer are drawn on the picture they refer to (`Picture N` in the question, else the latest).")
            state = gr.State(None)
            chatbot = gr.Chatbot(label=self.model_name, elem_id="chat", height=520, buttons=["copy"],
                                 feedback_options=None)
            with gr.Row():
                box = gr.Textbox(placeholder="Ask about the pictures", show_label=False, scale=6, elem_id="question",
                                 submit_btn=False, lines=1, max_lines=6)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                upload = gr.UploadButton("Upload pictures", file_types=["image"], file_count="multiple", scale=1,
                                         elem_id="upload")
            with gr.Row():
                regenerate = gr.Button("Regenerate", elem_id="regenerate")
                undo = gr.Button("Undo", elem_id="undo")
                clear = gr.Button("Clear", elem_id="clear")
                example = gr.Button("Example picture", elem_id="example")
            gr.Examples(examples=[[p] for p in EXAMPLE_PROMPTS], inputs=[box], label="Example prompts")
            with gr.Accordion("Settings", open=False):
                system = gr.Textbox(value="You are a helpful assistant.", label="System prompt", lines=2)
                with gr.Row():
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1, value=config.top_p or 1.0, step=0.05, label="Top-p")
                    max_new = gr.Slider(1, self.engine.max_model_len - 1, step=1, label="Max new tokens",
                                        value=min(config.max_new_tokens, self.engine.max_model_len - 1))
                    seed = gr.Textbox(value="", label="Seed (empty: random)")

            settings = [system, temperature, top_p, max_new, seed]
            views = [state, chatbot, box, send]
            stream = dict(fn=self.answer, inputs=[state] + settings, outputs=views, concurrency_limit=None,
                          show_progress="hidden")
            answers = [trigger(self.ask, [state, box], views, queue=False).success(**stream)
                       for trigger in (send.click, box.submit)]
            for trigger in (regenerate.click, chatbot.retry):
                answers.append(trigger(self.regenerate, state, views, queue=False).then(**stream))
            upload.upload(self.upload, [state, upload], [state, chatbot], concurrency_limit=None)
            example.click(self.add_example, state, [state, chatbot], queue=False)
            for trigger in (undo.click, chatbot.undo):
                trigger(self.undo, state, views, cancels=answers, queue=False)
            for trigger in (clear.click, chatbot.clear):
                trigger(self.clear, state, views, cancels=answers, queue=False)
        blocks.queue(default_concurrency_limit=None)
        return blocks


def mount(app: FastAPI, page: WebPage, path: str = "/", api_key: str | None = None) -> FastAPI:
    """The page on `app` at `path`; with an API key it sits behind Gradio's login, the key as password."""
    auth = (lambda user, password: hmac.compare_digest(password.encode(), api_key.encode())) if api_key else None
    return gr.mount_gradio_app(app, page.blocks, path, auth=auth, auth_message="The password is the server's API key."
                               if api_key else None, allowed_paths=[page.folder], ssr_mode=False, mcp_server=False,
                               pwa=False, theme=gr.themes.Default(), footer_links=[])


def web_app(engine: LLMEngine, tokenizer, model_name: str, media: MediaPolicy | None = None,
            max_images: int = 8) -> FastAPI:
    """`qwenvl web`: the page alone at /, its engine started and stopped with the app."""
    app = FastAPI(title="qwenvl web", lifespan=engine_lifespan(engine))
    app.state.engine = engine
    return mount(app, WebPage(engine, tokenizer, model_name, media, max_images))
