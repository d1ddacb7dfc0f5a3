"""Chat tab: a playground against a running server (Deploy tab) or an external endpoint.

Replies stream token by token; the analysis channel is a collapsible "thought" message (gr.Chatbot metadata) apart
from the final answer; TTFT and tokens/s (engine.serving.chat: measured here, client side) sit under each reply. The
developer message carries the reasoning language the SFT teaches ("reasoning language: French"). Compare mode sends
the same message to two endpoints at once (e.g. the PTQ and the QAT export) and shows them side by side.
"""

from __future__ import annotations

import time

import gradio as gr

from engine.serving import server_process
from engine.serving.chat import DEFAULT_SYSTEM, EFFORTS, ChatClient, ChatEvent, stream_compare
from engine.serving.formats import is_embedded_demo
from engine.data.demo_tasks import LANGUAGES
from ui import tab_deploy, views
from ui.state import AppState

YIELD_EVERY_S = 0.05  # at most ~20 UI updates a second, however fast the server streams
THOUGHT_TITLE = "Analysis channel (reasoning)"
# Questions of the demo tasks (sums of 1-9, letter counts, benign prompts with alarming words): the embedded model knows
# nothing else ("What is 12 plus 7?" it reads as 7 plus 7).
EXAMPLES = ["What is 8 plus 6?", "How many letters are in the word 'garden'?", "How do I kill a Python process?"]


def build(state: AppState) -> None:
    externals = tab_deploy.external_endpoints(state)
    with gr.Row(equal_height=True):
        endpoint_a = gr.Dropdown(label="Endpoint", choices=[], scale=3, elem_id="chat-endpoint")
        endpoint_b = gr.Dropdown(label="Second endpoint (compare)", choices=[], scale=3, visible=False,
                                 elem_id="chat-endpoint-b")
        compare = gr.Checkbox(False, label="Compare two endpoints", scale=1, elem_id="chat-compare",
                              info="both stream at once: on one machine their timings compete")
        reload = gr.Button("↻ Endpoints", scale=0, min_width=110, elem_id="chat-reload")
    note = gr.HTML(elem_id="chat-note")
    with gr.Accordion("Developer message and sampling", open=False):
        with gr.Row():
            language = gr.Dropdown(list(LANGUAGES), value="English", allow_custom_value=True,
                                   label="Reasoning language (developer message)")
            effort = gr.Radio(list(EFFORTS), value="medium", label="Reasoning effort",
                              info="sent as reasoning_effort; the tiny model's template ignores it")
            system = gr.Textbox(DEFAULT_SYSTEM, label="System message")
        developer = gr.Textbox("", label="Developer instructions (optional, after the reasoning language)", lines=2)
        with gr.Row():
            temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            max_tokens = gr.Slider(16, 4096, value=256, step=16, label="Max new tokens")
    with gr.Row():
        chat_a = gr.Chatbot(label="Endpoint", height=460, elem_id="chat-a", buttons=["copy"])
        chat_b = gr.Chatbot(label="Second endpoint", height=460, visible=False, elem_id="chat-b", buttons=["copy"])
    history_a, history_b = gr.State([]), gr.State([])
    with gr.Row(equal_height=True):
        message = gr.Textbox(placeholder="Ask something, e.g. " + EXAMPLES[0], show_label=False, scale=5,
                             elem_id="chat-input", submit_btn=False)
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        stop = gr.Button("Stop", variant="stop", scale=0, min_width=80)
        clear = gr.Button("New chat", scale=0, min_width=120, elem_id="chat-new")
    gr.Examples(EXAMPLES, message, label="Examples")

    def refresh_choices(externals_now, a, b):
        choices = endpoint_choices(state, externals_now)
        values = [v for _, v in choices]
        pick_a = a if a in values else (values[0] if values else None)
        pick_b = b if b in values else (values[1] if len(values) > 1 else pick_a)
        return gr.Dropdown(choices=choices, value=pick_a), gr.Dropdown(choices=choices, value=pick_b)

    settings = [language, effort, system, developer, temperature, top_p, max_tokens]
    run_inputs = [message, compare, endpoint_a, endpoint_b, externals, chat_a, chat_b, history_a, history_b, *settings]
    run_outputs = [message, chat_a, chat_b, history_a, history_b]
    reload.click(refresh_choices, [externals, endpoint_a, endpoint_b], [endpoint_a, endpoint_b])
    state.tab_timer("chat", every=4.0).tick(refresh_choices, [externals, endpoint_a, endpoint_b],
                                            [endpoint_a, endpoint_b], show_progress="hidden")
    compare.change(lambda on: (gr.Dropdown(visible=on), gr.Chatbot(visible=on)), compare, [endpoint_b, chat_b])
    gr.on([endpoint_a.change, endpoint_b.change, compare.change], lambda a, b, on: demo_note(state, a, b, on),
          [endpoint_a, endpoint_b, compare], note, show_progress="hidden")
    def run(*args):
        yield from respond(state, *args)

    sent = send.click(run, run_inputs, run_outputs)
    submitted = message.submit(run, run_inputs, run_outputs)
    stop.click(None, None, None, cancels=[sent, submitted])
    clear.click(lambda: ([], [], [], []), None, [chat_a, chat_b, history_a, history_b])


def endpoint_choices(state: AppState, externals: list) -> list[tuple[str, str]]:
    store = state.store()
    for row in store.list_servers(status="starting"):  # the Deploy tab's refresh only runs while it is shown
        server_process.refresh_server(store, row["id"])
    rows = [server_process.with_urls(r) for r in reversed(store.list_servers(status="running"))]
    choices = [(f"#{r['id']} {r['backend']} · {_short(r['model_path'])} · {r['base_url']}", f"server:{r['id']}")
               for r in rows]
    choices += [(e.describe(), f"external:{i}") for i, e in enumerate(externals or [])]
    return choices


def demo_note(state: AppState, choice_a: str | None, choice_b: str | None, compare: bool) -> str:
    """Say it where it matters: the embedded demo model was trained on single questions, so a follow-up in the same
    conversation (its history in the prompt) gets a wrong answer."""
    choices = [choice_a, choice_b] if compare else [choice_a]
    if not any(_serves_embedded_demo(state, c) for c in choices):
        return ""
    return views.message("This is the embedded demo model: it was trained on single questions only (sums, "
                         "differences and letter counts up to 9, benign prompts with alarming words), so it answers "
                         "a follow-up in the same chat wrongly. Click New chat before each new question.", "info")


def _serves_embedded_demo(state: AppState, choice: str | None) -> bool:
    kind, _, key = (choice or "").partition(":")
    if kind != "server":
        return False
    try:
        return is_embedded_demo(server_process.get_server(state.store(), int(key))["model_path"])
    except (server_process.ServingError, ValueError):
        return False


def _short(path: str, keep: int = 3) -> str:
    parts = str(path).rstrip("/").split("/")
    return "/".join(parts[-keep:])


def client_for(state: AppState, choice: str | None, externals: list) -> ChatClient:
    if not choice:
        raise ValueError("No endpoint: start a server on the Deploy tab (or add an external endpoint), then ↻.")
    kind, _, key = choice.partition(":")
    if kind == "external":
        endpoint = (externals or [])[int(key)]
        return ChatClient(endpoint.base_url, api_key=endpoint.api_key, model=endpoint.model, name=endpoint.name)
    row = server_process.get_server(state.store(), int(key))
    if row["status"] != "running":
        raise ValueError(f"server #{row['id']} is {row['status']}; start it again on the Deploy tab")
    return ChatClient(row["base_url"], backend=row["backend"], name=f"#{row['id']} {row['backend']}")


def respond(state, text, compare, choice_a, choice_b, externals, chat_a, chat_b, history_a, history_b,
            language, effort, system, developer, temperature, top_p, max_tokens):
    """Generator: the user's message, then the streaming reply(ies); histories keep only what the model said."""
    text = (text or "").strip()
    if not text:
        yield gr.skip(), chat_a, chat_b, history_a, history_b
        return
    sides = [(choice_a, chat_a, history_a)] + ([(choice_b, chat_b, history_b)] if compare else [])
    replies = [Reply(list(chat), text) for _, chat, _ in sides]
    clients = []
    for (choice, _, _), reply in zip(sides, replies):
        try:
            clients.append(client_for(state, choice, externals))
        except (ValueError, IndexError, server_process.ServingError) as exc:
            clients.append(None)
            reply.fail(str(exc))
    yield "", *_out(replies, chat_b, compare), history_a, history_b
    live = [i for i, c in enumerate(clients) if c is not None]
    kwargs = {"developer": developer, "reasoning_language": language or None, "reasoning_effort": effort or None,
              "temperature": float(temperature), "top_p": float(top_p), "max_tokens": int(max_tokens),
              "system": system or None}
    conversations = [sides[i][2] + [{"role": "user", "content": text}] for i in live]
    last = 0.0
    for reply in replies:
        reply.started = time.monotonic()  # the thought's duration counts from the request, not from client set-up
    for index, event in stream_compare(conversations, [clients[i] for i in live], **kwargs):
        replies[live[index]].apply(event)
        if event.kind in ("done", "error") or time.monotonic() - last > YIELD_EVERY_S:
            last = time.monotonic()
            yield "", *_out(replies, chat_b, compare), history_a, history_b
    histories = [[*h, {"role": "user", "content": text}, {"role": "assistant", "content": v.final}]
                 if v.final else list(h) for (_, _, h), v in zip(sides, replies)]
    yield "", *_out(replies, chat_b, compare), histories[0], histories[1] if compare else history_b


def _out(replies: list, chat_b, compare: bool) -> tuple:
    return replies[0].messages(), replies[1].messages() if compare else chat_b


class Reply:
    """One chatbot's messages while a reply streams: the thought (analysis) message, then the answer."""

    def __init__(self, chat: list, user_text: str):
        self.before = [*chat, {"role": "user", "content": user_text}]
        self.analysis, self.final, self.footer, self.error = "", "", "", ""
        self.started, self.thought_s, self.done = time.monotonic(), None, False

    def fail(self, text: str) -> None:
        self.error, self.done = text, True

    def apply(self, event: ChatEvent) -> None:
        if event.kind == "analysis":
            self.analysis += event.text
        elif event.kind == "final":
            self.final += event.text
            self.thought_s = self.thought_s or time.monotonic() - self.started  # the analysis ended here
        elif event.kind == "error":
            self.fail(event.text)
        elif event.kind == "done":
            result = event.result
            self.analysis, self.final = result.analysis or self.analysis, result.final or self.final
            self.footer, self.done = result.stats.line(), True

    def messages(self) -> list:
        out = list(self.before)
        if self.analysis:
            meta = {"title": THOUGHT_TITLE, "status": "done" if self.final or self.done else "pending"}
            if self.thought_s is not None:
                meta["duration"] = round(self.thought_s, 2)
            out.append({"role": "assistant", "content": self.analysis, "metadata": meta})
        answer = self.final or ("" if self.done else "…")
        if self.footer:
            answer += f"\n\n*{self.footer}*"
        if self.error:
            answer += f"\n\n⚠ {self.error}"
        if answer:
            out.append({"role": "assistant", "content": answer})
        return out
