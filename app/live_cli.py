"""`python run.py live`: desktop live conversation in a Gradio app on this machine.

Cheap imports only at module level (run.py imports this to build its parser).
"""
from __future__ import annotations

import sys

from .agent import add_agent_arguments
from .turn_end_args import add_turn_end_arguments


def _camera(value: str):
    return int(value) if value.strip().isdigit() else value


def _device(value: str):
    return int(value) if value.strip().isdigit() else value


def add_arguments(p) -> None:
    add_agent_arguments(p, model_help="fusion checkpoint (default: the shipped "
                        "assets/fusion.safetensors; the page lists every checkpoint in assets/)",
                        random_help="start with an untrained demo-preset agent (random weights)")
    p.add_argument("--camera", type=_camera, default=0, metavar="INDEX|VIDEO",
                   help="camera index, or a video file standing in for the camera (looped); "
                        "'none' for no camera (default: %(default)s)")
    p.add_argument("--input-device", type=_device, default=None, metavar="NAME|INDEX",
                   help="microphone (default: the system's default input)")
    p.add_argument("--output-device", type=_device, default=None, metavar="NAME|INDEX",
                   help="speaker (default: the system's default output)")
    p.add_argument("--half-duplex", action="store_true",
                   help="mute the microphone while the agent speaks (loudspeakers without "
                        "echo cancellation would otherwise interrupt the agent)")
    add_turn_end_arguments(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    p.add_argument("--share", action="store_true",
                   help="also create a public gradio.live link (off by default)")


def run(args) -> None:
    import os
    from pathlib import Path
    if args.random and args.model:
        sys.exit("error: pass either --model PATH or --random, not both")
    camera = None if str(args.camera).lower() == "none" else args.camera
    from .agent import DEFAULT_MODEL
    from .gradio_handlers import RANDOM, ROOT
    from .live import LiveOptions
    from .live_inputs import probe_devices
    model = RANDOM if args.random else args.model
    if model is None:
        if not DEFAULT_MODEL.exists():
            print(f"(no trained model at {DEFAULT_MODEL}: starting with an untrained agent; "
                  "pass --model PATH for a trained one)")
            model = RANDOM
        else:
            model = str(DEFAULT_MODEL.relative_to(ROOT))
    elif model != RANDOM and not Path(model).exists():
        sys.exit(f"error: no fusion model at {model}; pass --model PATH or --random")
    try:
        from .engine import EngineOptions
        from .turn_end_args import turn_end_kwargs
        options = LiveOptions(mode=args.mode, camera=camera, input_device=args.input_device,
                              output_device=args.output_device, half_duplex=args.half_duplex,
                              engine=EngineOptions(**turn_end_kwargs(args)))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print("checking the camera and the sound card ...", flush=True)
    notices = probe_devices(options)
    for n in notices:
        print(f"note: {n}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .gradio_app import launch
    from .gradio_handlers import LiveController
    ctl = LiveController(options, model=model, device=args.device, notices=notices)
    # quiet: no Gradio banner nor its share hint (launch prints the URL); --share prints
    # Gradio's public link
    launch(ctl, args.host, args.port, share=args.share, quiet=not args.share)
