"""The Gradio chat app behind `qatune chat`: streamed answers, sampling sliders, a queue.

    qatune chat                      # http://127.0.0.1:7860, params.yaml `generate`, `chat`, `domain`
    qatune chat --mode adapter --port 7861

Local only by default (chat.host 127.0.0.1, no gradio.live link unless chat.share or --share). One
generation runs at a time (chat.concurrency_limit) and later users wait in a bounded queue
(chat.max_queue): a small CPU box answers one question fast rather than several slowly.
"""

from __future__ import annotations

import os
from typing import Any

# Gradio otherwise reports usage to its servers at import and launch time.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from qatune import inference  # noqa: E402
from qatune.cards import recipe  # noqa: E402
from qatune.demo import demo_questions  # noqa: E402
from qatune.errors import QatuneError  # noqa: E402
from qatune.params import ChatParams, GenerateParams, Params  # noqa: E402

# Slider ranges: temperature above ~1.2 turns a 135M model's answers into noise; the token slider stops
# at 2048 because the adaptive cap (free memory, context window) lowers anything beyond what fits.
TEMPERATURE_MAX = 1.5
MAX_NEW_TOKENS_MAX = 2048
EXAMPLES = 6  # demo questions offered under the chat box
# Prefix of the app's refusals (too long, out of memory): such exchanges are left out of later prompts.
REFUSAL = "⚠️ "


def message_text(content: Any) -> str | None:
    """The text of one chat-history message (a string, or Gradio's list of content blocks); None if none."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [c if isinstance(c, str) else c.get("text") for c in content if isinstance(c, str | dict)]
        text = "".join(p for p in parts if isinstance(p, str))
        return text or None
    return None


def plain_history(history: list[dict] | None) -> list[dict]:
    """Gradio's history as role/content text messages for the prompt.

    Files and components are left out, and so is every refused exchange: an over-long question must not
    reach the model through the history after being turned away.
    """
    out: list[dict] = []
    for m in history or []:
        text = message_text(m.get("content"))
        if text is None:
            continue
        if m.get("role") == "assistant" and text.startswith(REFUSAL):
            if out and out[-1]["role"] == "user":
                out.pop()
            continue
        out.append({"role": m.get("role"), "content": text})
    return out


def make_respond(loaded: inference.Loaded, params: Params, settings: GenerateParams):
    """The ChatInterface callback: refuse bad input with a message, else stream the growing answer."""

    def respond(message: str, history: list[dict], temperature: float, top_p: float, max_new_tokens: float):
        try:
            question = inference.check_question(message, params.chat.max_input_chars)
            current = inference.generation_settings(
                settings, temperature=temperature, top_p=top_p, max_new_tokens=int(max_new_tokens)
            )
            messages = inference.build_messages(question, params.train.system_prompt, plain_history(history))
            answer = ""
            for piece in inference.stream_answer(loaded, messages, current):
                answer += piece
                yield answer
        except QatuneError as err:
            yield f"{REFUSAL}{err}"
            return
        if not answer.strip():
            yield "(the model ended its answer without any text; try again or raise the temperature)"

    return respond


def description(params: Params, loaded: inference.Loaded) -> str:
    """What this run did to the model (from params, as the model cards say it) and what is serving."""
    how, _ = recipe(params)
    return (
        f"A LoRA fine-tune by qatune: {how}.  \n{params.domain.disclaimer}  \n"
        f"Model: `{loaded.source}` on {loaded.device} ({loaded.dtype})."
    )


def build_app(loaded: inference.Loaded, params: Params, settings: GenerateParams) -> gr.ChatInterface:
    """The chat UI with sliders preset from params; queue limits from params.chat."""
    sliders = [
        gr.Slider(
            0.0, TEMPERATURE_MAX, value=settings.temperature, step=0.05, label="Temperature (0 = greedy)"
        ),
        gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="Top-p"),
        gr.Slider(
            1,
            max(MAX_NEW_TOKENS_MAX, settings.max_new_tokens),
            value=settings.max_new_tokens,
            step=1,
            label="Max new tokens",
        ),
    ]
    demo = gr.ChatInterface(
        make_respond(loaded, params, settings),
        additional_inputs=sliders,
        additional_inputs_accordion=gr.Accordion("Generation settings", open=True),
        # One-item rows: shown as cards in the empty chat, answered with the sliders' current values.
        examples=[[q] for q in demo_questions(EXAMPLES, params.domain.demo_questions)],
        cache_examples=False,
        title=params.domain.title,
        description=description(params, loaded),
        textbox=gr.Textbox(placeholder=params.domain.placeholder or None, submit_btn=True),
        analytics_enabled=False,
        api_name="chat",
    )
    return demo.queue(default_concurrency_limit=params.chat.concurrency_limit, max_size=params.chat.max_queue)


def launch_kwargs(
    chat: ChatParams, host: str | None = None, port: int | None = None, share: bool | None = None
) -> dict[str, Any]:
    """Where to listen: params.chat unless a flag says otherwise (None = not given)."""
    return {
        "server_name": host or chat.host,
        "server_port": port or chat.port,
        "share": chat.share if share is None else share,
    }


def serve(
    loaded: inference.Loaded,
    params: Params,
    settings: GenerateParams,
    host: str | None = None,
    port: int | None = None,
    share: bool | None = None,
) -> None:
    """Build and run the app until interrupted."""
    launch(build_app(loaded, params, settings), params, host, port, share)


def launch(demo, params: Params, host: str | None, port: int | None, share: bool | None) -> None:
    """Run a built app (single or side by side) on chat's address until interrupted."""
    kwargs = launch_kwargs(params.chat, host, port, share)
    if kwargs["server_name"] not in ("127.0.0.1", "localhost", "::1"):
        print(f"qatune: listening on {kwargs['server_name']}: reachable from your network", flush=True)
    try:
        demo.launch(**kwargs)
    except OSError as err:  # port taken, address not available
        raise QatuneError(
            f"chat: cannot listen on {kwargs['server_name']}:{kwargs['server_port']}: {err}"
        ) from None


# --------------------------------------------------------------------------- side by side (`--compare`)
# Kept apart from the single-model chat above: two models answer the same question, the sides are dealt at
# random and their names stay hidden until the vote, and each vote is appended to chat.votes as a
# preference row (qatune.feedback) that the fetch stage reads back as training data.

COMPARE_NOTE = (
    "Two models answer each question, on sides drawn at random; which model wrote which answer is shown "
    "after your vote. Each vote is saved as a preference pair (the better answer as chosen) for the next "
    "training run; “both bad” is saved too, but never trained on."
)


EMPTY_ANSWER = "(the model ended its answer without any text)"


def compare_answers(contestants: dict, params: Params, settings: GenerateParams, rng):
    """The Ask callback: deal the sides, then stream the left answer, then the right one.

    Yields (left, right, round, vote buttons enabled); `round` is what the vote needs (question, sides,
    answers) and is None while answering, so a vote cannot land on a half-written pair."""
    from qatune.feedback import deal

    names = tuple(contestants)

    def ask(message: str, temperature: float, top_p: float, max_new_tokens: float):
        hold = gr.update(interactive=False)
        try:
            question = inference.check_question(message, params.chat.max_input_chars)
            current = inference.generation_settings(
                settings, temperature=temperature, top_p=top_p, max_new_tokens=int(max_new_tokens)
            )
        except QatuneError as err:
            yield f"{REFUSAL}{err}", "", None, hold, hold, hold, ""
            return
        sides = deal(names, rng)
        messages = inference.build_messages(question, params.train.system_prompt)
        answers = {"left": "", "right": ""}
        for side in ("left", "right"):
            try:
                for piece in inference.stream_answer(contestants[sides[side]], messages, current):
                    answers[side] += piece
                    yield answers["left"], answers["right"], None, hold, hold, hold, ""
            except QatuneError as err:
                answers[side] = f"{REFUSAL}{err}"
            answers[side] = answers[side].strip()
        if any(a.startswith(REFUSAL) for a in answers.values()):  # no vote on an error message
            yield answers["left"], answers["right"], None, hold, hold, hold, "One model could not answer."
            return
        ready = gr.update(interactive=True)
        round_ = {"question": question, "sides": sides, "answers": answers}
        shown = [answers[side] or EMPTY_ANSWER for side in ("left", "right")]  # the file keeps the real ""
        yield *shown, round_, ready, ready, ready, ""

    return ask


def compare_vote(votes_path: str, pick: str):
    """A vote button's callback: append the row, reveal the sides, refresh the tally, lock the buttons."""
    from qatune.feedback import BOTH_BAD, append_vote, read_votes, tally, tally_markdown, vote_row

    def vote(round_: dict | None):
        hold = gr.update(interactive=False)
        if not round_:
            return None, "Ask a question first.", gr.update(), hold, hold, hold
        sides = round_["sides"]
        append_vote(votes_path, vote_row(round_["question"], sides, round_["answers"], pick))
        verdict = "both answers bad" if pick == BOTH_BAD else f"{pick} preferred"
        reveal = (
            f"**Left: `{sides['left']}` · Right: `{sides['right']}`** ({verdict}; saved to `{votes_path}`)"
        )
        return None, reveal, tally_markdown(tally(read_votes(votes_path))), hold, hold, hold

    return vote


def build_compare_app(
    contestants: dict, params: Params, settings: GenerateParams, votes_path: str, seed: int | None = None
) -> gr.Blocks:
    """Two answers side by side, three vote buttons, the running tally per model (read from the votes file,
    so it carries over between sessions). `contestants` maps each model's name to its loaded model."""
    import random

    from qatune.feedback import BOTH_BAD, read_votes, tally, tally_markdown

    rng = random.Random(seed)
    with gr.Blocks(title=f"{params.domain.title}: compare", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {params.domain.title}: which answer is better?\n{COMPARE_NOTE}  \n{params.domain.disclaimer}"
        )
        question = gr.Textbox(
            label="Question", placeholder=params.domain.placeholder or None, elem_id="compare-question"
        )
        ask_button = gr.Button("Ask both models", variant="primary", elem_id="compare-ask")
        with gr.Row():
            left = gr.Textbox(label="Left answer", lines=8, interactive=False, elem_id="compare-left")
            right = gr.Textbox(label="Right answer", lines=8, interactive=False, elem_id="compare-right")
        with gr.Row():
            buttons = [
                gr.Button("Left is better", interactive=False, elem_id="vote-left"),
                gr.Button("Right is better", interactive=False, elem_id="vote-right"),
                gr.Button("Both are bad", interactive=False, elem_id="vote-both-bad"),
            ]
        reveal = gr.Markdown(elem_id="compare-reveal")
        gr.Markdown("### Tally")
        board = gr.Markdown(tally_markdown(tally(read_votes(votes_path))), elem_id="compare-tally")
        with gr.Accordion("Generation settings", open=False):
            temperature = gr.Slider(
                0.0, TEMPERATURE_MAX, value=settings.temperature, step=0.05, label="Temperature (0 = greedy)"
            )
            top_p = gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="Top-p")
            tokens = gr.Slider(
                1,
                max(MAX_NEW_TOKENS_MAX, settings.max_new_tokens),
                value=settings.max_new_tokens,
                step=1,
                label="Max new tokens",
            )
        round_ = gr.State(None)
        ask = compare_answers(contestants, params, settings, rng)
        outputs = [left, right, round_, *buttons, reveal]
        ask_button.click(ask, [question, temperature, top_p, tokens], outputs, api_name="compare")
        question.submit(ask, [question, temperature, top_p, tokens], outputs, api_name=False)
        for button, pick in zip(buttons, ("left", "right", BOTH_BAD), strict=True):
            button.click(
                compare_vote(votes_path, pick), [round_], [round_, reveal, board, *buttons], api_name=False
            )
    return demo.queue(default_concurrency_limit=params.chat.concurrency_limit, max_size=params.chat.max_queue)


def serve_compare(
    contestants: dict,
    params: Params,
    settings: GenerateParams,
    votes_path: str,
    host: str | None = None,
    port: int | None = None,
    share: bool | None = None,
) -> None:
    """Build and run the side-by-side app until interrupted."""
    launch(build_compare_app(contestants, params, settings, votes_path), params, host, port, share)
