"""Every rate, hop and window size of Tandem, in one place, with its derivation.

Input side (microphone, VAD, Whisper) runs at 16 kHz. Output side (the agent's voice)
runs at the codec's own rate, which lives in the codec's config (16 kHz for the demo
codec, 24 kHz for pretrained EnCodec); `CodecSpec` carries it at run time.
"""

# --- input audio -------------------------------------------------------------------------
SAMPLE_RATE = 16_000                       # Hz: microphone, VAD and Whisper all use it
N_FFT = 400                                # 25 ms analysis window (Whisper)
HOP_LENGTH = 160                           # 10 ms hop (Whisper)
N_MELS = 80                                # Whisper's mel bins (large-v3 uses 128)
MEL_FRAME_RATE = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames / s
ENCODER_STRIDE = 2                         # Whisper encoder's second conv has stride 2
AUDIO_FEATURE_RATE = MEL_FRAME_RATE // ENCODER_STRIDE  # 50 encoder frames / s
SAMPLES_PER_FEATURE = SAMPLE_RATE // AUDIO_FEATURE_RATE  # 320 samples per encoder frame
WHISPER_CHUNK_SECONDS = 30                 # Whisper's fixed window, used only for parity
WHISPER_N_CTX = WHISPER_CHUNK_SECONDS * AUDIO_FEATURE_RATE  # 1500 encoder positions

# --- voice activity detection (silero-vad) -----------------------------------------------
VAD_WINDOW = 512                           # silero-vad takes exactly 512 samples at 16 kHz
VAD_WINDOW_SECONDS = VAD_WINDOW / SAMPLE_RATE  # 32 ms

# --- scene audio, encoded continuously as it arrives --------------------------------------
SCENE_CHUNK_SECONDS = 1.0                  # mic audio is encoded in 1 s chunks
SCENE_CHUNK_SAMPLES = int(SCENE_CHUNK_SECONDS * SAMPLE_RATE)  # 16 000

# --- video --------------------------------------------------------------------------------
DEMO_FRAME_SIZE = (320, 240)               # (W, H) of demo-world frames; sessions may differ
DEMO_WORLD_FPS = 10                        # demo-world render rate
SAMPLER_FPS = 5.0                          # default rate frames are sampled for the model

# --- turn timing --------------------------------------------------------------------------
CONTEXT_SECONDS = 6.0                      # questions are about the 6 s before they end
END_OF_TURN_SILENCE = 0.4                  # s of silence that ends a user turn
TURN_END_PAUSE = 0.2                       # s of silence at which the end-of-turn predictor
                                           # (speech/turn_end.py) is asked (Smart Turn: 0.2)
TURN_END_THRESHOLD = 0.5                   # P(complete) at that pause that ends the turn (0.9
                                           # cut no fewer hesitations in replay and sent 9% of
                                           # turns to the longest silence: docs/HISTORY.md)
QUESTION_PAD = 0.05                        # s of audio kept before the VAD's speech start

# --- PCM ------------------------------------------------------------------------------------
PCM16_MAX = 32767                          # int16 full scale used for float <-> PCM16
