"""`quantgate infer`: one request to a running server, from arrays or from text, and its
answer printed."""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from quantgate.cli._app import command
from quantgate.cli._console import out
from quantgate.serve.config import MAX_CLASS_COUNT

if TYPE_CHECKING:
    from quantgate.tokenizer import Text


@command()
def infer(
    model: Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL",
            help="Model name, as ModelMetadata reports it; default: the name in --bundle's "
            "manifest (a repository serves a model under its folder's name instead).",
            show_default=False,
        ),
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            metavar="NAME=JSON",
            help=(
                "NAME=JSON, e.g. -i 'input_ids=[[5, 7, 9]]'; NAME=@FILE reads the JSON from "
                "a file, NAME=- from standard input. Given input_ids, a missing "
                "attention_mask is all ones, a missing token_type_ids all zeros (as a "
                "tokenizer gives them)."
            ),
        ),
    ] = None,
    texts: Annotated[
        list[str] | None,
        typer.Option(
            "--text",
            "-t",
            metavar="TEXT",
            help="Text to send instead of token ids, tokenized by --bundle's tokenizer; "
            "repeat it for a batch. @FILE reads it from a file (UTF-8, its last line break "
            "left out), - from standard input; @@ starts a text with @.",
        ),
    ] = None,
    text_pairs: Annotated[
        list[str] | None,
        typer.Option(
            "--text-pair",
            "-p",
            metavar="TEXT",
            help="The second text of a pair, for a model that reads two (a reranker's query "
            "and passage, a question and its context, NLI's premise and hypothesis): once per "
            "--text, in the same order; tokenized with it as one sequence, as "
            "tokenizer(text, text_pair) does. @FILE and - as for --text (a long context).",
        ),
    ] = None,
    null_answer: Annotated[
        bool | None,
        typer.Option(
            "--null-answer/--no-null-answer",
            help="A question answerer may answer nothing (a SQuAD 2.0 model): 'no answer' "
            "where the first token's span scores above every span of the context. [default: "
            "as the bundle was gated (its null_answer setting), else no]",
            show_default=False,
        ),
    ] = None,
    bundle_dir: Annotated[
        Path | None,
        typer.Option(
            "--bundle",
            metavar="BUNDLE",
            help="The bundle the server serves: its tokenizer reads --text, its name is "
            "MODEL's default.",
        ),
    ] = None,
    outputs: Annotated[
        list[str] | None,
        typer.Option(
            "--output",
            "-o",
            metavar="NAME",
            help="Ask only for this output (repeatable); default all.",
        ),
    ] = None,
    classes: Annotated[
        int,
        typer.Option(
            "--classes",
            "-c",
            min=0,
            max=MAX_CLASS_COUNT,
            metavar="K",
            help="Print each row's top K classes (score, index, class name) instead of the "
            "tensor: Triton's classification extension, asked of the --output given, else of "
            "every output with a class axis (outputs of one value per row are left out).",
        ),
    ] = 0,
    url: Annotated[
        str, typer.Option(metavar="HOST:PORT", help="Server address.")
    ] = "localhost:8001",
    version: Annotated[
        str, typer.Option(metavar="VERSION", help="Model version (default: the newest).")
    ] = "",
    token: Annotated[
        str | None,
        typer.Option(envvar="QUANTGATE_AUTH_TOKEN", metavar="TOKEN", help="Bearer token."),
    ] = None,
    timeout: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="Seconds before giving up; inf: no deadline."),
    ] = 30.0,
    tls: Annotated[
        bool, typer.Option("--tls", help="Use TLS, trusting the system's CA certificates.")
    ] = False,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, metavar="FILE", help="PEM CA that signed the server (TLS)."
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, metavar="FILE", help="PEM client certificate (mutual TLS)."
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, metavar="FILE", help="PEM private key for --tls-cert."
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the answer as one JSON object, every value of every output in full: "
            '{"model": ..., "outputs": {NAME: {"datatype", "shape", "data"}}} '
            '(top classes as Triton\'s "score:index:label" strings), for scripts and jq; '
            'a question answerer\'s adds "pairs": the --text each row read (a long context '
            "is read in several windows, a row each).",
        ),
    ] = False,
) -> None:
    """Send one request to a running server and print the outputs.

    Inputs are arrays (-i NAME=JSON), or text (-t TEXT --bundle BUNDLE; -t TEXT -p TEXT for
    a pair) that the bundle's own tokenizer turns into them.
    """

    from quantgate.bundle import load
    from quantgate.errors import ConfigError
    from quantgate.serve.config import token_problem, url_problem
    from quantgate.tasks import QA_OUTPUTS, QA_TASKS

    if null_answer is not None and not text_pairs:
        raise ConfigError(
            "--null-answer reads a question answerer's answers to its questions: give each as "
            "-t QUESTION -p CONTEXT --bundle BUNDLE"
        )
    if text_pairs and not texts:
        raise ConfigError("--text-pair needs --text: each pair is -t TEXT -p TEXT_PAIR")
    if not inputs and not texts:
        raise ConfigError(
            "nothing to send: give -i NAME=JSON per input, or -t TEXT --bundle BUNDLE"
        )
    if texts and bundle_dir is None:
        raise ConfigError("--text needs --bundle: the bundle whose tokenizer reads the text")
    if text_pairs and len(text_pairs) != len(texts or ()):
        raise ConfigError(
            f"--text-pair given {len(text_pairs)} time(s) for {len(texts or ())} --text: give "
            "one --text-pair per --text, in the same order (each pair is one row)"
        )
    if model is None and bundle_dir is None:
        raise ConfigError(
            "which model? Give its name (MODEL, as the server serves it), or --bundle BUNDLE "
            "for the name in the bundle's manifest"
        )
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("mutual TLS needs both --tls-cert and --tls-key")
    if not timeout > 0:  # NaN too
        raise ConfigError(
            f"--timeout must be more than 0 seconds (inf: no deadline), got {timeout:g}"
        )
    if token and (problem := token_problem(token)):
        raise ConfigError(
            f"--token (or QUANTGATE_AUTH_TOKEN): the token {problem}: a bearer token is "
            "printable ASCII without spaces (a token read from a file keeps its line break: "
            "strip it)"
        )
    if problem := url_problem(url):
        raise ConfigError(f"--url {url}: {problem}")
    stdin = [f"--input {i.partition('=')[0]}" for i in inputs or () if i.endswith("=-")]
    stdin += [f"--text {t}" for t in texts or () if t == "-"]
    stdin += [f"--text-pair {t}" for t in text_pairs or () if t == "-"]
    if len(stdin) > 1:
        raise ConfigError(
            f"standard input is read once, but {' and '.join(stdin)} each ask for it: give one "
            "of them as -, the others inline or as @FILE"
        )
    given = _read_inputs(inputs or [])  # each -i's JSON, parsed: its names checked below
    texts = [_text("--text", t) for t in texts or ()]
    text_pairs = [_text("--text-pair", t) for t in text_pairs or ()]
    rows: list[Text] = list(texts)  # each -t, or with -p each pair
    if texts and text_pairs:
        rows = list(zip(texts, text_pairs, strict=True))
    # verified: the tokenizer is the one the bundle was gated with
    bundle = None if bundle_dir is None else load(bundle_dir, verify=bool(texts))
    if classes and bundle is not None:
        _refuse_classes_of(bundle.manifest.task, str(bundle.path), texts=bool(texts))
    if null_answer is not None and bundle is not None and bundle.manifest.task not in QA_TASKS:
        raise ConfigError(
            f"--null-answer: {bundle.path} is a {bundle.manifest.task} model, which answers no "
            "questions; drop --null-answer"
        )
    scores_alone = outputs and not set(QA_OUTPUTS) <= set(outputs)  # no answer printed
    if null_answer is not None and (as_json or scores_alone):
        raise ConfigError(
            f"--null-answer reads the answers infer prints; {'--json' if as_json else '-o'} "
            "prints the scores instead: drop one of the two"
        )
    if bundle is not None and bundle.manifest.task in QA_TASKS and texts and not text_pairs:
        raise ConfigError(
            f"{bundle.path} answers questions from a context: give each as -t QUESTION -p "
            "CONTEXT (a question alone has no context to answer from)"
        )
    if model is not None:
        named = model
    else:  # the name in the bundle's manifest (one of the two is given: checked above)
        assert bundle is not None
        named = bundle.manifest.name
    # gRPC's own log lines (a failed TLS handshake's, at INFO) would come before this
    # command's error, which says what went wrong and what to do; GRPC_VERBOSITY=INFO
    # brings them back. Set before gRPC starts, which reads it once.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    # gRPC and the wire format (about 0.6 s) once the command line and the bundle are known to be usable
    from quantgate.serve.client import Client, ClientTLS

    secure = tls or tls_ca is not None or tls_cert is not None
    tls_flags = {"--tls": tls, "--tls-ca": tls_ca, "--tls-cert": tls_cert, "--tls-key": tls_key}
    client_tls = ClientTLS(tls_ca, tls_cert, tls_key) if secure else None
    with Client(url, token=token, timeout=timeout, tls=client_tls) as client:
        metadata = _metadata(
            client, named, version, bundle_dir if model is None else None, tls_flags
        )
        # ModelConfig, asked once and only where needed: --bundle and --classes check the
        # served model (more rows than its max batch size: Client.infer splits them)
        config = functools.cache(lambda: client.config(named, version))
        if bundle is not None:
            _check_served_from(bundle, named, metadata, config().parameters, texts=bool(texts))
        if classes:  # the task the server says, whatever --bundle's is
            _refuse_classes_of(config().parameters["task"].string_value, f"model {named!r}")
        # tags: a token classifier's class names and tokens read; places: a question
        # answerer's tokens' places in the text, and each row's text where a context was
        # read in windows (None: not read from text)
        tags, places = None, None
        values: dict[str, Any] = {}
        if texts:
            assert bundle is not None  # --text needs --bundle (checked above)
            values, tags, places = _tokenized(rows, bundle)
        feeds = _feeds(metadata, named, values, given)
        wanted = tuple(outputs or ())
        if classes:
            wanted = _classified(metadata.outputs, wanted)
        answer = client.infer(named, feeds, version=version, outputs=wanted, classes=classes)
    _print_answer(answer, named, rows, tags, places, classes=classes, as_json=as_json,
                  rule=None if places is None else _answer_rule(bundle, null_answer))  # fmt: skip


def _feeds(metadata, named: str, values: dict[str, Any], given: dict) -> dict:
    """The request's arrays: the tokenizer's ``values`` and each -i's (``given``: name ->
    (its text, its value)), in the datatypes of the model's inputs (``metadata``), with what
    request_inputs adds; BadRequest where one is unknown, given twice, or cannot be sent."""
    from quantgate.errors import BadRequest
    from quantgate.serve.client import InputRefused, request_inputs

    spec = {t.name: t for t in metadata.inputs}
    for name in given:
        if name not in spec:
            raise BadRequest(
                f"--input {name}: model {named!r} has no such input: expected NAME=JSON "
                f"with NAME one of {sorted(spec)}"
            )
        if name in values:
            raise BadRequest(f"--input {name}: --text gives it; give each input once")
    values = {**values, **{name: value for name, (_, value) in given.items()}}
    typed = {name: text for name, (text, _) in given.items()}  # as given, for errors
    try:
        return request_inputs(metadata, values)
    except InputRefused as e:
        raise BadRequest(_refused(e, typed, spec, values)) from e


def _print_answer(answer: dict, named: str, rows: list, tags, places, *, classes: int,
                  as_json: bool, rule: dict | None) -> None:  # fmt: skip
    """``answer`` as infer prints it: JSON; a question answerer's answers (read by ``rule``,
    as ``_answer_rule`` gives it) where text was asked with both its scores; a token
    classifier's tags; top classes; else each output's array."""
    import numpy as np

    from quantgate.tasks import QA_OUTPUTS

    if as_json:  # with each row's pair, where a long context was read in windows
        _print_json(named, answer, None if places is None else places[1])
        return
    if places is not None and set(QA_OUTPUTS) <= answer.keys():
        assert rule is not None  # given where places are
        start, end = (answer.pop(n) for n in QA_OUTPUTS)
        _print_answers(rows, start, end, *places, **rule)
    elif places is not None and places[1] is not None and len(places[1]) > len(rows):  # -o
        out.print(
            f"rows: windows of the --text pairs {places[1].tolist()} (a long context is read "
            "in several)",
            highlight=False,
            soft_wrap=True,
        )
    for name, array in answer.items():
        if array.dtype == object and classes:  # top classes, as asked for
            _print_classes(name, array)
        elif array.dtype == object:  # another server's BYTES output: its strings
            out.print(f"{name} {list(array.shape)} BYTES", highlight=False, soft_wrap=True)
            text = np.vectorize(lambda b: b.decode(errors="backslashreplace"), otypes=[object])
            out.print(str(text(array)), highlight=False, soft_wrap=True)
        elif tags is not None and name == "logits" and array.ndim == 3:
            _print_tags(rows, array, *tags)
        else:
            out.print(f"{name} {list(array.shape)} {array.dtype}", highlight=False, soft_wrap=True)
            out.print(
                np.array2string(array, precision=4, threshold=64), highlight=False, soft_wrap=True
            )


def _metadata(client, named: str, version: str, manifest_of: Path | None, tls_flags: dict):
    """The server's ModelMetadata of ``named``, its errors said in infer's flags:
    ``manifest_of`` is the bundle whose manifest gave the name (None: MODEL gave it),
    ``tls_flags`` each TLS flag's value."""
    from quantgate.errors import ModelNotFound, Unauthenticated
    from quantgate.serve.client import ConnectionFailed

    try:
        return client.metadata(named, version)
    except ModelNotFound as e:
        if manifest_of is None:
            raise
        raise ModelNotFound(
            f"{e}. {named!r} is the name in {manifest_of}'s manifest; a repository serves "
            "each model under its folder's name: give that name as MODEL"
        ) from e
    except Unauthenticated as e:
        raise Unauthenticated(
            f"{e} (`quantgate infer` sends --token, or the QUANTGATE_AUTH_TOKEN variable)"
        ) from e
    except ConnectionFailed as e:
        raise ConnectionFailed(_cannot_connect(e, tls_flags), e.cause, e.what) from e


def _check_served_from(bundle, named: str, metadata, served, *, texts: bool) -> None:
    """Refuse a --bundle that is not the model the server serves as ``named``: other tensors,
    another task (``served``: its ModelConfig's parameters), or, where its tokenizer reads
    --text, none of its variants' files (a classifier with a token classifier's tensor
    names: its tokenizer and its task would answer for another model)."""
    from quantgate.errors import BadRequest

    m = bundle.manifest
    ours = ([t.name for t in m.inputs], [t.name for t in m.outputs])
    theirs = ([t.name for t in metadata.inputs], [t.name for t in metadata.outputs])
    task = served["task"].string_value if "task" in served else None
    sha = served["variant_sha256"].string_value if "variant_sha256" in served else None
    advice = f"give the bundle {named!r} is served from"
    if sorted(ours[0]) != sorted(theirs[0]) or sorted(ours[1]) != sorted(theirs[1]):
        differs = (
            f"inputs {ours[0]}, outputs {ours[1]}), not the one the server serves as {named!r} "
            f"(inputs {theirs[0]}, outputs {theirs[1]})"
        )
    elif task and task != m.task:
        differs = f"a {m.task} model), not the {task} model the server serves as {named!r}"
    elif texts and sha and sha not in {v.sha256 for v in m.variants}:  # the same model's?
        differs = (
            f"none of whose files is the one the server serves as {named!r}: sha256 {sha[:12]}...)"
        )
        advice = (
            "pass the bundle the server was started from: another bundle's tokenizer may read "
            "the text otherwise (a re-export with the same tokenizer is still another bundle)"
        )
    else:
        return
    raise BadRequest(f"--bundle {bundle.path} is model {m.name!r} ({differs}; {advice}")


def _tokenized(texts: list[Text], bundle):
    """--text (with --text-pair: pairs) read by ``bundle``'s tokenizer: the inputs it gives,
    for a token classifier its class names and each text's tokens as read
    (``Tokenizer.pieces``), and for a question answerer where each token stands in the text
    (``Tokenizer.places``) and the text each row reads (a context longer than the model is
    read in overlapping windows, a row each: ``tokenizer.Windows``); None for any other
    task."""
    from quantgate.quantize.data import ModelInfo
    from quantgate.quantize.text import tokenize, tokenizer_of, windows
    from quantgate.tasks import QA_TASKS, TOKEN_TASKS

    info = ModelInfo.from_manifest(bundle.manifest, bundle.path)
    tok = tokenizer_of(info)
    if info.task in QA_TASKS and (read := windows(texts, info, tok)) is not None:
        values, w = read
        return values, None, (w.places, w.pairs)
    values = tokenize(texts, info, tok)
    limit = info.max_seq_len or None
    if info.task in TOKEN_TASKS:
        return values, (bundle.manifest.class_names, tok.pieces(texts, limit)), None
    if info.task in QA_TASKS:
        places = tok.places(texts, limit)
        return values, None, None if places is None else (places, None)
    return values, None, None


def _print_json(model: str, answer: dict, pairs=None) -> None:
    """``answer`` as one line of JSON on stdout, each value in full (float32 as the shortest
    decimal that reads back to it); ``"pairs"``, the --text each row read, where a question
    answerer read a long context in windows, a row each (``pairs``)."""
    import json
    import sys

    import numpy as np

    from quantgate.serve.dtypes import datatype

    outputs = {}
    for name, array in answer.items():
        if array.dtype == object:  # top classes: Triton's "score:index[:label]" bytes
            data = [s.decode(errors="backslashreplace") for s in array.ravel()]
            kind = "BYTES"
            data = np.array(data, dtype=object).reshape(array.shape).tolist()
        else:
            kind = datatype(array.dtype)
            if array.dtype == np.float32:  # its shortest decimal, not float64's 17 digits
                array = array.astype(str).astype(np.float64)  # the same float32 read back
            data = _finite(array.tolist()) if array.dtype.kind == "f" else array.tolist()
        outputs[name] = {"datatype": kind, "shape": list(array.shape), "data": data}
    doc: dict = {"model": model, "outputs": outputs}
    if pairs is not None:
        doc["pairs"] = pairs.tolist()
    sys.stdout.write(json.dumps(doc, allow_nan=False) + "\n")


def _finite(data):
    """Nested lists of floats with NaN and infinities as None: JSON has no token for them
    (Python writes NaN, which strict parsers refuse), null where a score is not a number."""
    if isinstance(data, list):
        return [_finite(x) for x in data]
    return data if math.isfinite(data) else None


def _cannot_connect(e, tls_given: dict) -> str:
    """The client's ConnectionFailed ``e`` with what to do in infer's flags (``tls_given``:
    each TLS flag's value)."""
    tls_ca = tls_given["--tls-ca"]
    tls_flags = [flag for flag, value in tls_given.items() if value]  # those given
    drop = " and ".join(
        [", ".join(tls_flags[:-1]), *tls_flags[-1:]] if tls_flags[1:] else tls_flags
    )
    if not tls_flags:  # a TLS server closes a plaintext connection
        closed = "If it serves TLS, pass --tls-ca CA.pem (or --tls for a certificate trusted here)."
    elif "--tls-cert" not in tls_flags:  # as a mutual-TLS server closes one without a certificate
        closed = "If it asks for a client certificate (mutual TLS), pass --tls-cert and --tls-key."
    else:
        closed = "See the server's log for why (a certificate its --tls-client-ca did not sign?)."
    advice = {
        "unresolved": "Check the host in --url.",
        "untrusted": "Pass --tls-ca with the CA that signed the server's certificate (a "
        "self-signed certificate is its own CA)"
        + ("." if tls_ca is None else f"; {tls_ca} is not it."),
        "hostname": "Give --url the name its certificate holds.",
        "not_tls": f"Drop {drop} to connect in plaintext.",
        "not_grpc": "Give --url the server's gRPC port.",
        "closed": closed,
    }.get(e.cause)
    if advice is None:  # nothing answered: refused, or a cause gRPC did not say
        advice = "Start a server with `quantgate serve BUNDLE`, or pass --url to reach another."
    return f"{e.what}. {advice}"


def _classified(outputs, wanted: tuple[str, ...]) -> tuple[str, ...]:
    """The outputs --classes asks the top classes of: those ``wanted`` (-o), else every
    output with classes to rank, an axis after the batch's. An output of one value per row
    (a predicted index, a score) has none: Triton's rule would rank that one value, always
    "index 0"."""
    from quantgate.errors import ConfigError

    # (batch,) or (batch, 1): one value per row, a regression's score among them
    flat = [t.name for t in outputs if len(t.shape) < 2 or list(t.shape[1:]) == [1]]
    if named := [n for n in wanted if n in flat]:
        shape = next(list(t.shape) for t in outputs if t.name == named[0])
        raise ConfigError(
            f"--classes: output {named[0]!r} is one value per row (shape {shape}), with no "
            "classes to rank; drop --classes, or ask it of another output"
        )
    if wanted:
        return wanted
    if not (ranked := tuple(t.name for t in outputs if t.name not in flat)):
        raise ConfigError(
            f"--classes: every output is one value per row ({', '.join(flat)}), with no "
            "classes to rank; drop --classes"
        )
    return ranked


def _refuse_classes_of(task: str, what: str, *, texts: bool = False) -> None:
    """--classes on a model (``what``: the bundle, or the model the server names) whose rows
    are not one score per class: Triton's classification reads everything after the batch
    axis as a row, so a tagger's "classes" would be the largest scores over all its tokens
    (index token * classes + class, unnamed), and an embedding's the largest coordinates of
    its vectors. Refused, with what to ask instead (``texts``: text was sent, which prints
    each token's class). An unknown task ("": an older server) is let through."""
    from quantgate.errors import ConfigError
    from quantgate.tasks import EMBEDDING_TASKS, QA_TASKS, TOKEN_TASKS

    if task in TOKEN_TASKS:
        instead = (
            "Drop --classes: with text, each token's top class is printed by name."
            if texts
            else "For each token's top class by name, send text: -t TEXT --bundle BUNDLE; "
            "for the scores, drop --classes."
        )
        raise ConfigError(
            f"--classes: {what} is a token classifier ({task}), whose logits are "
            "(batch, sequence, classes). --classes reads everything after the batch axis as "
            "one row (Triton's rule), so it would print the largest scores over all tokens, "
            f"indexed token * classes + class, without names. {instead}"
        )
    if task in QA_TASKS:
        instead = (
            "Drop --classes: with text, each row's answer is printed."
            if texts
            else "For each row's answer, send text: -t QUESTION -p CONTEXT --bundle BUNDLE; for "
            "the scores, drop --classes."
        )
        raise ConfigError(
            f"--classes: {what} answers questions ({task}): its start_logits and end_logits "
            "score each token as the answer's start and end, not classes; --classes would "
            f"print the highest-scoring positions without their text. {instead}"
        )
    if task in EMBEDDING_TASKS:
        raise ConfigError(
            f"--classes: {what} is an embedding model ({task}): it has no classes, and "
            "--classes would print the largest coordinates of each row's flattened vectors. "
            "Drop --classes to print its outputs."
        )


def _print_classes(name: str, strings) -> None:
    """One line per row: its top classes, best first, from Triton's "score:index[:label]"."""
    rows = strings.reshape(-1, strings.shape[-1]) if strings.ndim else strings.reshape(1, -1)
    k = rows.shape[1]
    out.print(
        f"{name}: {f'top {k} classes' if k != 1 else 'top class'} of each row", highlight=False
    )
    for r, row in enumerate(rows):
        items = []
        for s in row:
            score, index, *label = s.decode().split(":", 2)
            named = f"{label[0]!r} ({index})" if label else index
            items.append(f"{named} {float(score):.4f}")
        out.print(f"  row {r}: " + ", ".join(items), highlight=False, soft_wrap=True)


def _print_tags(texts: list[Text], logits, names: tuple[str, ...], pieces: list[list[str]]) -> None:
    """A token classifier's answer to text as a person reads it: each real token of each
    text (its ``pieces``, the first positions of its row: texts are padded on the right,
    and a model may take no attention mask to tell), its top class by name and its softmax
    probability."""
    import numpy as np

    from quantgate.tokenizer import quoted

    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    say = functools.partial(out.print, highlight=False, markup=False, soft_wrap=True)  # "[CLS]"
    say(f"logits {list(logits.shape)}: each token's top class")
    for text, tokens, p in zip(texts, pieces, probs, strict=True):
        say(f"  {quoted(text)}")
        for token, row in zip(tokens, p[: len(tokens)], strict=True):  # padded on the right
            top = int(row.argmax())
            label = names[top] if top < len(names) else str(top)
            say(f"    {token:<16} {label:<12} {row[top]:.3f}")


def _answer_rule(bundle, null_answer: bool | None = None) -> dict:
    """How ``bundle``'s gates read a question answerer's answers (the gate settings it was
    last gated with: max_answer_tokens, null_answer), as ``spans.answers`` takes them: infer
    prints the answers the gates judged. ``null_answer``: --null-answer's, over the bundle's
    (None: not given)."""
    from quantgate.quantize.regating import DEFAULT_GATES, recorded_gate_config

    cfg = recorded_gate_config(bundle.manifest) or DEFAULT_GATES
    if null_answer is None:
        null_answer = cfg.null_answer
    return {"max_tokens": cfg.max_answer_tokens, "null_answer": null_answer}


def _print_answers(
    texts: list[Text], start, end, places: list, pairs, *, max_tokens: int, null_answer: bool
) -> None:
    """An extractive question answerer's answer to each (question, context) pair
    (``spans.answers``, the span_agreement gate's rule) and its probability; the window it
    was found in where a context was read in several (``pairs``: each row's text)."""
    import numpy as np

    from quantgate.spans import answers
    from quantgate.tokenizer import quoted

    say = functools.partial(out.print, highlight=False, markup=False, soft_wrap=True)
    say(f"start_logits, end_logits {list(start.shape)}: each row's answer")
    windows = np.bincount(pairs, minlength=len(texts)) if pairs is not None else None
    found = answers(
        texts, start, end, places, pairs, max_tokens=max_tokens, null_answer=null_answer
    )
    for row, (text, answer) in enumerate(zip(texts, found, strict=True)):
        say(f"  {quoted(text)}")
        if answer is None:
            say("    no answer (no token of the context, or scores that are not finite)")
            continue
        if answer.none:  # the first token's span: SQuAD 2.0's no answer (null_answer)
            say(
                "    no answer: the first token's span scores above every span of the context "
                f"(SQuAD 2.0's; null_answer), probability {answer.probability:.3f}"
            )
            continue
        where = f"tokens {answer.first}..{answer.last}"
        if windows is not None and windows[row] > 1:
            nth = answer.window - int(np.flatnonzero(pairs == row)[0]) + 1
            where = f"window {nth} of {windows[row]}, {where}"
        say(f"    {answer.text!r}  ({where}, probability {answer.probability:.3f})")


def _read_inputs(inputs: list[str]) -> dict[str, tuple[str, object]]:
    """Each --input NAME=JSON, by name: its JSON as given and its value, read and parsed
    (``_json_input``). Read before connecting, so that a file that is not there or JSON cut
    short is said as the input's, not hidden behind a server that cannot be reached; the
    names are the model's to check, once the server has said them."""
    from quantgate.errors import BadRequest

    read: dict[str, tuple[str, object]] = {}
    for item in inputs:
        name, sep, text = item.partition("=")
        if not (sep and name):
            raise BadRequest(
                f"--input {item!r}: expected NAME=JSON, e.g. -i 'input_ids=[[5, 7, 9]]'"
            )
        if name in read:
            raise BadRequest(f"--input {name}: it is given twice; give each input once")
        read[name] = (text, _json_input(name, text))
    return read


def _read(shown: str, value: str) -> tuple[str, str]:
    """An argument's value as given, or read: @FILE's (UTF-8; a shell caps one argument at
    128 KiB, which a long context or a large array passes), - for standard input's; @@ for
    a value that starts with @. With where it came from, for errors: " (FILE)", " (standard
    input)", "" where given inline. ``shown``: the argument as typed before the value
    ("--text ", "--input NAME="), for a file that cannot be read."""
    import sys

    from quantgate.errors import BadRequest

    if value == "-":  # a byte-order mark as a file's: no part of the value
        return sys.stdin.read().removeprefix("\ufeff"), " (standard input)"
    if value.startswith("@@"):
        return value[1:], ""
    if value.startswith("@"):
        try:
            # a byte-order mark, as Windows editors save one, is no part of the value; line
            # breaks as written ("\r\n" is two characters to a byte-level BPE tokenizer, as
            # in a JSONL row and on standard input)
            with open(value[1:], encoding="utf-8-sig", newline="") as f:
                return f.read(), f" ({value[1:]})"
        except (OSError, UnicodeDecodeError) as e:
            raise BadRequest(
                f"{shown}{value}: cannot read {value[1:]} ({e}); give a file that can be "
                f"read, or @@ for a value that starts with @ ({shown}@{value})"
            ) from e
    return value, ""


def _text(flag: str, value: str) -> str:
    """A --text or --text-pair as given, or read (``_read``: @FILE, -, @@). Read, the line
    break that ends a file (echo's, an editor's) is no part of the text: a byte-level BPE or
    SentencePiece tokenizer made a token of it, and the answer moved."""
    text, where = _read(f"{flag} ", value)
    return text.removesuffix("\n").removesuffix("\r") if where else text


def _json_input(name: str, text: str):
    """One --input's JSON value (the client's ``request_inputs`` makes it an array): given
    inline, or read (``_read``: @FILE, -)."""
    import json

    from quantgate.errors import BadRequest

    text, where = _read(f"--input {name}=", text)
    try:
        return json.loads(text)
    except ValueError as e:
        raise BadRequest(f"--input {name}{where}: not JSON ({e}); expected e.g. [[5, 7, 9]]") from e


def _refused(e, typed: dict[str, str], spec: dict, values: dict) -> str:
    """The client's InputRefused ``e`` said of --input's flag (``typed``: each input's JSON
    as given, ``values`` as read), with how to wrap one row as a batch of one where the
    value is one row: its dimensions those of the input after the batch."""
    import numpy as np

    if e.cause == "unknown":  # --input's names are checked: one --text's tokenizer gives
        return f"--text: {e}"
    datatype = spec[e.name].datatype
    if e.cause == "datatype":  # a BYTES input, given or to fill in
        return f"input {e.name!r} is {datatype}, which `quantgate infer` cannot send"
    text = typed.get(e.name)
    if e.cause == "not_numbers" and text is not None:
        return f"--input {e.name}: expected numbers that fit {datatype}, got {text}"
    if e.cause != "rank" or text is None:
        return f"--input {e.name}: {e.what}"
    row = list(spec[e.name].shape)[1:]  # -1: any size
    try:
        given = np.shape(values[e.name])
    except ValueError:  # ragged
        given = ()
    shape = ", ".join("N" if d == -1 else str(d) for d in row)
    if 0 in given:  # [[]] would be refused next: a row holds values
        return f"--input {e.name}: {e.what}; a row of it is ({shape}), with N at least 1"
    if len(given) != len(row) or any(d not in (-1, g) for d, g in zip(row, given, strict=True)):
        return f"--input {e.name}: {e.what}; a row of it is ({shape})"
    if text.startswith(("@", "-")):  # from a file, or standard input
        return f"--input {e.name}: {e.what}; send one row as a batch of one: wrap it in [ ]"
    wrapped = f"[{text.strip()}]"
    wrapped = wrapped if len(wrapped) <= 40 else wrapped[:34] + " ... ]]"
    return f"--input {e.name}: {e.what}; send one row as a batch of one: -i '{e.name}={wrapped}'"
