"""speech.resample: one streaming resampler (libsoxr) for every stream, any ratio."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from speech.audio import float_to_pcm16, pcm16_to_float
from speech.resample import StreamResampler, resample_whole


@pytest.mark.parametrize("rate", [8000, 8003, 11025, 16000, 44100, 47999, 48000])
def test_chunked_input_equals_whole_stream(rate):
    """What the server does with a client's input: PCM16 messages of any size at `rate`."""
    rng = np.random.default_rng(rate)
    x = float_to_pcm16(rng.uniform(-0.5, 0.5, rate // 2 + 123).astype(np.float32))
    ref = resample_whole(pcm16_to_float(x.tobytes()), rate, 16000)
    rs, outs, i = StreamResampler(rate, 16000), [], 0
    while i < len(x):
        n = int(rng.integers(1, rate // 25))             # up to 40 ms per message
        outs.append(rs.feed(pcm16_to_float(x[i:i + n].tobytes())))
        i += n
    early = np.concatenate(outs)
    y = np.concatenate([early, rs.flush()])
    assert len(y) == len(ref) == round(len(x) * 16000 / rate)
    np.testing.assert_allclose(y, ref, atol=1e-6)       # far within one PCM16 step
    assert len(ref) - len(early) <= 0.125 * 16000        # holds back one block at most


def test_flush_starts_a_new_stream_and_rates_are_checked():
    x = np.random.default_rng(0).uniform(-0.5, 0.5, 4410).astype(np.float32)
    rs = StreamResampler(44100, 16000)
    first = np.concatenate([rs.feed(x), rs.flush()])
    second = np.concatenate([rs.feed(x), rs.flush()])
    np.testing.assert_array_equal(first, second)
    same = StreamResampler(16000, 16000)
    np.testing.assert_array_equal(same.feed(x), x)
    assert len(same.flush()) == 0
    for bad in (0, -8000, 16000.5, True, 10**7):
        with pytest.raises(ValueError, match="sample rate"):
            StreamResampler(bad, 16000)


def test_an_odd_rate_costs_no_more_memory_than_48k():
    """8003 Hz shares no factor with 16 kHz: a gcd-sized sinc kernel needs gigabytes. The
    peak memory of streaming 2 s through a resampler built for it, and of resampling 1 s
    offline (speech.audio.resample: a session's mic.wav), stays within 100 MB."""
    script = textwrap.dedent("""
        import resource, numpy as np
        from speech.resample import StreamResampler
        import soxr, torchaudio.functional             # imports paid before the baseline
        from speech.audio import resample
        x = np.zeros(8003 // 50, np.float32)
        StreamResampler(48000, 16000).feed(x)
        resample(np.zeros(48000, np.float32), 48000, 16000)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rs = StreamResampler(8003, 16000)
        n = sum(len(rs.feed(x)) for _ in range(100)) + len(rs.flush())
        assert len(resample(np.zeros(8003, np.float32), 8003, 16000)) == 16000
        print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    n, grew_kb = int(out[0]), int(out[1])
    assert n == round(2 * 8003 // 50 * 50 * 16000 / 8003)
    assert grew_kb < 100 * 1024, f"peak memory grew by {grew_kb / 1024:.0f} MB"
