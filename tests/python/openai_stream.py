#!/usr/bin/env python3
"""Talk to a prfaas node with the official `openai` Python package.

Usage: openai_stream.py BASE_URL [MODEL] [PROMPT]

BASE_URL is the node's root (http://127.0.0.1:8080), with or without `/v1`. MODEL defaults to the
first entry of /v1/models. The script streams one chat completion (printing the text as it
arrives), then makes one non-stream call. It exits non-zero when the stream carried no content or
no finish_reason, or when the non-stream answer lacks content or usage, so CI can use it as a
compatibility check. Install the client with `pip install openai`.
"""

import sys

try:
    from openai import OpenAI
except ImportError:
    print("error: the `openai` package is not installed (pip install openai)", file=sys.stderr)
    sys.exit(2)


def fail(message: str) -> None:
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    base = sys.argv[1].rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    prompt = sys.argv[3] if len(sys.argv) > 3 else "Name three colours of the rainbow."
    # The node needs no key, but the client insists on one. No retries: a failure should show.
    client = OpenAI(base_url=base, api_key="prfaas", timeout=600.0, max_retries=0)
    model = sys.argv[2] if len(sys.argv) > 2 else client.models.list().data[0].id
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": prompt},
    ]

    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage, chunks, route = [], None, None, 0, None
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        # The node's extension rides along as an extra field on the final chunk.
        extra = getattr(chunk, "model_extra", None) or {}
        if extra.get("prfaas"):
            route = extra["prfaas"].get("route")
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
                print(choice.delta.content, end="", flush=True)
            if choice.finish_reason:
                finish = choice.finish_reason
    print()
    text = "".join(parts)
    print(f"stream: chunks={chunks} finish_reason={finish} usage={usage} route={route}")
    if not text:
        fail("the stream carried no content")
    if finish is None:
        fail("the stream carried no finish_reason")
    if usage is None or usage.completion_tokens <= 0:
        fail("the stream carried no usage chunk despite include_usage")

    resp = client.chat.completions.create(
        model=model, messages=messages, max_tokens=48, temperature=0
    )
    content = resp.choices[0].message.content if resp.choices else None
    print(f"non-stream: finish_reason={resp.choices[0].finish_reason} usage={resp.usage}")
    print(content)
    if not content:
        fail("the non-stream answer has no content")
    if resp.usage is None or resp.usage.prompt_tokens <= 0 or resp.usage.completion_tokens <= 0:
        fail("the non-stream answer has no usage")
    print("OK")


if __name__ == "__main__":
    main()
