"""The chat demo: a Gradio page over a `ChatEngine`, storing votes and edits in a `FeedbackStore`.

Every browser session has its own conversation (a `gr.State`); up to one reply per engine slot is generated
at once, on the same continuous-batching engine as the HTTP API, so several people chat at the same time.
Analytics are off and nothing is shared outside the host.
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import secrets  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import gradio as gr  # noqa: E402

from lmjax.config import LmjaxError  # noqa: E402
from lmjax.serve.engine import ChatEngine  # noqa: E402
from lmjax.serve.feedback import FeedbackStore  # noqa: E402
from lmjax.serve.safety import ContentFilter  # noqa: E402
from lmjax.text.blocklist import Blocklist  # noqa: E402
from lmjax.text.chat_template import Message  # noqa: E402

DEFAULT_SYSTEM = "You are a helpful assistant that explains Python."


def new_session() -> dict:
    """A session's state: its id, the conversation without the system prompt, and the feedback-store
    id of each stored reply by its index in the conversation."""
    return {"session": "", "messages": [], "reply_ids": {}, "turns": 0}


def build_demo(engine: ChatEngine, feedback: FeedbackStore, content_filter: ContentFilter) -> gr.Blocks:
    """The chat page."""

    def generate(state: dict, system: str, temperature: float, top_p: float, max_tokens: int,
                 request: gr.Request | None) -> Iterator[tuple[list[Message], dict]]:
        """Streams a reply to the conversation in `state` (which ends with the user's message)."""
        session = state["session"] = state["session"] or (request.session_hash if request else None) or \
            secrets.token_hex(8)
        messages = state["messages"]
        if content_filter.screen_input(messages[-1]["content"], session):
            state["messages"] = messages + [{"role": "assistant", "content": content_filter.refusal}]
            yield state["messages"], state
            return
        conversation = ([{"role": "system", "content": system}] if system.strip() else []) + messages
        settings = {"temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": int(max_tokens),
                    "seed": state["turns"]}
        state["turns"] += 1
        try:
            stream = engine.stream_reply(conversation, **settings)
            text = ""
            for text in content_filter.screen_stream(stream, session):
                state["messages"] = messages + [{"role": "assistant", "content": text}]
                yield state["messages"], state
        except LmjaxError as e:
            state["messages"] = messages[:-1]
            raise gr.Error(str(e)) from None
        state["messages"] = messages + [{"role": "assistant", "content": text}]
        if text != content_filter.refusal:
            state["reply_ids"][len(messages)] = feedback.record_reply(conversation, text, engine.step, settings,
                                                                      session)
        yield state["messages"], state

    def respond(message: str, state: dict, system: str, temperature: float, top_p: float, max_tokens: int,
                request: gr.Request):
        """Adds the user's message and streams the reply."""
        if not message.strip():
            yield message, state["messages"], state
            return
        state["messages"] = state["messages"] + [{"role": "user", "content": message}]
        yield "", state["messages"], state
        for chat, new_state in generate(state, system, temperature, top_p, max_tokens, request):
            yield "", chat, new_state

    def regenerate(state: dict, system: str, temperature: float, top_p: float, max_tokens: int,
                   request: gr.Request):
        """Replaces the last reply with a new sample."""
        messages = state["messages"]
        if messages and messages[-1]["role"] == "assistant":
            state["reply_ids"].pop(len(messages) - 1, None)
            state["messages"] = messages[:-1]
        if not state["messages"]:
            yield state["messages"], state
            return
        yield from generate(state, system, temperature, top_p, max_tokens, request)

    def vote(data: gr.LikeData, state: dict) -> None:
        """Stores a thumbs up / down on a stored reply."""
        index = data.index[0] if isinstance(data.index, list | tuple) else data.index
        reply_id = state["reply_ids"].get(index)
        if reply_id is None:
            return
        if data.liked is True:
            feedback.rate(reply_id, 1)
        elif data.liked is False:
            feedback.rate(reply_id, -1)
        else:
            feedback.unrate(reply_id)

    def last_reply(state: dict) -> str:
        messages = state["messages"]
        return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""

    def save_edit(text: str, state: dict):
        """Stores the user's correction of the last reply and shows it in its place."""
        messages = state["messages"]
        reply_id = state["reply_ids"].get(len(messages) - 1)
        if reply_id is None or not text.strip():
            raise gr.Error("there is no stored reply to edit (or the edit is empty)")
        feedback.edit(reply_id, text)
        state["messages"] = messages[:-1] + [{"role": "assistant", "content": text}]
        gr.Info("Edit saved.")
        return "", state["messages"], state

    def clear(state: dict):
        return [], {**new_session(), "session": state["session"]}

    with gr.Blocks(title="lmjax chat") as demo:
        gr.Markdown("## lmjax chat\nReplies stream from the model; rate them with thumbs up / down and correct "
                    "the last one below. Votes and edits are stored to improve the model.")
        state = gr.State(new_session())
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chatbot")
                message = gr.Textbox(placeholder="Ask something and press Enter", show_label=False,
                                     elem_id="message", autofocus=True)
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    again = gr.Button("Regenerate", elem_id="regenerate")
                    reset = gr.Button("Clear", elem_id="clear")
                with gr.Accordion("Edit the last reply", open=False):
                    edit_box = gr.Textbox(lines=3, show_label=False, elem_id="edit")
                    with gr.Row():
                        load = gr.Button("Load last reply")
                        save = gr.Button("Save edit", elem_id="save-edit")
            with gr.Column(scale=1):
                system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=3)
                temperature = gr.Slider(0.0, 2.0, 0.7, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, 0.9, step=0.05, label="Top-p")
                max_tokens = gr.Slider(1, engine.context, min(128, engine.context), step=1, label="Max new tokens")
                with gr.Accordion("Model card", open=False):
                    gr.JSON(engine.model_card(), show_label=False)

        controls = [system, temperature, top_p, max_tokens]
        run = {"concurrency_limit": engine.engine.num_slots, "concurrency_id": "model"}
        submitted = message.submit(respond, [message, state, *controls], [message, chatbot, state],
                                   api_name="chat", **run)
        clicked = send.click(respond, [message, state, *controls], [message, chatbot, state], api_name=False, **run)
        redone = again.click(regenerate, [state, *controls], [chatbot, state], api_name="regenerate", **run)
        stop.click(None, cancels=[submitted, clicked, redone])
        reset.click(clear, state, [chatbot, state], api_name=False)
        chatbot.like(vote, state, None, api_name=False)
        load.click(last_reply, state, edit_box, api_name=False)
        save.click(save_edit, [edit_box, state], [edit_box, chatbot, state], api_name=False)
    return demo


def launch(engine: ChatEngine, feedback: FeedbackStore | None = None, content_filter: ContentFilter | None = None,
           host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Serves the demo (feedback in the run's `feedback.sqlite`, the default blocklist) until interrupted;
    with `block=False` returns the running demo (stop it with `.close()`)."""
    if feedback is None:
        if engine.workdir is None:
            raise ValueError("pass a FeedbackStore: the engine has no run directory to keep feedback in")
        feedback = FeedbackStore.for_workdir(engine.workdir.path)
    content_filter = content_filter or ContentFilter(Blocklist.default(), feedback)
    demo = build_demo(engine, feedback, content_filter)
    demo.queue().launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                        show_error=True)
    return demo
