"""Drive `q3vl serve` with the official `openai` package, as an application would.

Runs the conversations named in a JSON request file against `--base-url` and prints
one JSON document: for each case its answer text (non-streamed), its streamed text, the
finish reasons and the usage. tests/serve_clients.rs compares them with `q3vl run`.

Request file: {"model": ..., "max_tokens": N, "cases": {"name": [messages...], ...}}
where messages are OpenAI chat messages (image parts as data: URLs).
"""

import argparse
import json
import sys
from pathlib import Path

import openai


def run_case(client, model: str, max_tokens: int, messages: list) -> dict:
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    streamed, finishes, usage = [], [], None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_completion_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                streamed.append(choice.delta.content)
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    return {
        "text": whole.choices[0].message.content,
        "finish": whole.choices[0].finish_reason,
        "usage": whole.usage.model_dump(),
        "streamed": "".join(streamed),
        "stream_finishes": finishes,
        "stream_usage": usage,
    }


def errors(client, model: str) -> dict:
    """The typed exceptions the package raises for the server's error answers."""
    out = {}
    try:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    except openai.NotFoundError as e:
        out["unknown_model"] = [e.status_code, e.body.get("code") if isinstance(e.body, dict) else None]
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], temperature=7)
    except openai.BadRequestError as e:
        out["bad_temperature"] = [e.status_code, e.body.get("param") if isinstance(e.body, dict) else None]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="http://HOST:PORT/v1")
    ap.add_argument("--requests", required=True, help="the request file (see above)")
    args = ap.parse_args(argv)
    req = json.loads(Path(args.requests).read_text())
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=300)
    models = [m.id for m in client.models.list()]
    result = {
        "openai": openai.__version__,
        "models": models,
        "cases": {name: run_case(client, req["model"], req["max_tokens"], m) for name, m in req["cases"].items()},
        "errors": errors(client, req["model"]),
    }
    json.dump(result, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
