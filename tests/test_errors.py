"""quantgate's errors cross process boundaries whole: a worker's error sent to its parent
(multiprocessing pickles it) keeps its class, its message and every attribute."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_every_error_pickles_with_its_attributes():
    """ConnectionFailed (nothing listening: the commonest client error) and InputRefused
    could not be read back: their __init__ takes more than the message, and a pool of
    processes broke (BrokenProcessPool) or hung on the first one. Run apart: the client's
    protos and tritonclient's (tests/serve) cannot share a process."""
    script = textwrap.dedent(
        """
        import pickle

        from quantgate import errors
        from quantgate.serve.client import ConnectionFailed, InputRefused

        def every(cls):
            for sub in cls.__subclasses__():
                yield sub
                yield from every(sub)

        made = [
            errors.GateFailed("2 gates failed", "bundles/x"),
            errors.ConfigError("min_cosine 1.5: expected -1..1", [("min_cosine", "1.5")]),
            errors.ValidationError("mismatch", ["logits: 0.3 off"]),
            errors.Unavailable("full", "queue_full"),
            ConnectionFailed("nothing listens at 127.0.0.1:1", "refused", "connection refused"),
            InputRefused("ids", "rank", "expected 2 dimensions, got 1"),
        ]
        made += [cls("message") for cls in set(every(errors.QuantgateError))
                 if cls not in {type(e) for e in made}
                 and cls.__init__ is errors.QuantgateError.__init__]
        assert len(made) > 20, len(made)
        for e in made:
            back = pickle.loads(pickle.dumps(e))
            assert type(back) is type(e) and str(back) == str(e), (e, back)
            assert back.__dict__ == e.__dict__, (type(e), back.__dict__, e.__dict__)
            assert back.exit_code == e.exit_code
        print("ok", len(made))
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok "), r.stderr
