"""The desktop live-conversation app (Gradio 6, localhost): preview, transcript, latency and
attention plots, start/stop, model and generation mode; a browser-devices tab (webcam and
microphone streamed from the browser, the reply streamed back) and a demo-replay tab.
The page polls the active conversation's state with a gr.Timer; handlers live in
`app.gradio_handlers.LiveController`.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no network calls from the app

import gradio as gr  # noqa: E402

from .gradio_handlers import LiveController  # noqa: E402

POLL_SECONDS = 0.5
MIC_CHUNK_SECONDS = 0.1         # browser microphone chunk (Gradio's recorder sends 0.1 s)
WEBCAM = {"video": {"width": {"ideal": 640}, "height": {"ideal": 480}}}  # enough for the model
LATENCY_COLORS = {"response": "#e4572e", "compute": "#17a2b8"}
ATTENTION_COLORS = {"video": "#6f42c1", "audio": "#f0ad4e"}
CSS = """
#tandem-notice {border-left: 4px solid #e8a317; padding: 0 12px; background: #fff8e6;}
#tandem-notice h3 {margin: 4px 0;}
#tandem-notice:empty {display: none;}
"""


def build_app(ctl: LiveController) -> gr.Blocks:
    """The page, wired to `ctl`."""
    with gr.Blocks(title="Tandem live") as demo:
        gr.Markdown("## Tandem — live conversation\nTalk to the agent in front of the camera: "
                    "it sees and hears the scene and answers out loud.")
        notice = gr.Markdown(ctl.notices_markdown(), elem_id="tandem-notice")
        status = gr.Markdown(ctl.status_markdown(None))
        with gr.Row():
            with gr.Column(scale=2):
                preview = gr.Image(label="Camera", type="numpy", interactive=False, height=260)
                with gr.Row(equal_height=True):
                    model = gr.Dropdown(ctl.models, value=ctl.default_model, label="Model",
                                        scale=3)
                    mode = gr.Radio(["vanilla", "mctp"], value=ctl.options.mode, scale=2,
                                    label="Generation")
                with gr.Tabs():
                    with gr.Tab("This computer"):
                        with gr.Row():
                            start = gr.Button("▶ Start", variant="primary")
                            stop = gr.Button("■ Stop")
                            interrupt = gr.Button("Interrupt")
                    with gr.Tab("Browser devices"):
                        gr.Markdown("When the app runs on another machine: your browser's "
                                    "webcam and microphone stream to the agent; its voice "
                                    "streams back.")
                        with gr.Row():
                            b_start = gr.Button("▶ Start browser session", variant="primary")
                            b_stop = gr.Button("■ Stop")
                        webcam = gr.Image(sources=["webcam"], streaming=True, type="numpy",
                                          label="Webcam", height=200,
                                          webcam_options=gr.WebcamOptions(constraints=WEBCAM))
                        mic = gr.Audio(sources=["microphone"], streaming=True, type="numpy",
                                       label="Microphone")
                        voice = gr.Audio(streaming=True, autoplay=True, interactive=False,
                                         label="Agent's voice")
                    with gr.Tab("Demo replay"):
                        sessions = ctl.demo_sessions()
                        gr.Markdown("Replays a recorded session (its microphone and camera) "
                                    "through the agent at real time." if sessions else
                                    f"No recorded sessions in `{ctl.sessions_dir}` yet "
                                    "(record one with `python run.py record`).")
                        session = gr.Dropdown(sessions, label="Session",
                                              value=sessions[0] if sessions else None)
                        with gr.Row():
                            d_start = gr.Button("▶ Replay", variant="primary",
                                                interactive=bool(sessions))
                            d_stop = gr.Button("■ Stop")
                        reply = gr.Audio(label="Agent's replies (no speaker here)",
                                         interactive=False)
            with gr.Column(scale=3):
                chat = gr.Chatbot(label="Conversation", height=280, feedback_options=None,
                                  placeholder="Say something: your turns and the agent's "
                                              "replies appear here.")
                with gr.Row():
                    # starts empty (None): Gradio 6 fixes a plot's colour domain at its first
                    # non-empty data, so no empty frame is ever sent; color_map names all series
                    latency = gr.LinePlot(None, x="turn", y="latency_ms", color="kind",
                                          height=230, title="Latency per turn", x_title="turn",
                                          y_title="ms", color_map=LATENCY_COLORS)
                    attention = gr.LinePlot(None, x="t", y="weight", color="modality",
                                            height=230, title="Aggregator attention, last turn",
                                            x_title="s before the question ends",
                                            y_title="attention",
                                            color_map=ATTENTION_COLORS)
        metrics = gr.Dataframe(label="Turns", interactive=False, wrap=True,
                               value=metrics_frame(None))

        views = [status, notice, preview, chat, latency, attention]

        def refresh():
            *rest, lat, att = ctl.refresh()
            return (*rest, None if lat.empty else lat, None if att.empty else att)

        start.click(ctl.start_local, [model, mode], status).then(refresh, None, views)
        stop.click(ctl.stop, None, status)
        b_stop.click(ctl.stop, None, status)
        d_stop.click(ctl.stop, None, status)
        interrupt.click(lambda: ctl.session and ctl.session.interrupt(), None, None)
        b_start.click(ctl.start_browser, [model, mode], status).then(
            ctl.browser_voice, None, voice, concurrency_limit=None, show_progress="hidden")
        d_start.click(ctl.start_demo, [session, model, mode], status)
        webcam.stream(ctl.browser_frame, webcam, None, stream_every=0.2,
                      concurrency_limit=4, show_progress="hidden")
        mic.stream(ctl.browser_mic, mic, None, stream_every=MIC_CHUNK_SECONDS,
                   concurrency_limit=4, show_progress="hidden")
        timer = gr.Timer(POLL_SECONDS)
        timer.tick(refresh, None, views, show_progress="hidden")
        seen = {"turns": -1}

        def slow_refresh():
            snap = ctl.snapshot()
            n = len(snap.metrics) if snap else 0
            if n == seen["turns"]:
                return gr.skip(), gr.skip()
            seen["turns"] = n
            audio = ctl.reply_audio(snap)
            return metrics_frame(snap), audio if audio is not None else gr.skip()

        gr.Timer(1.0).tick(slow_refresh, None, [metrics, reply], show_progress="hidden")
        demo.load(refresh, None, views)
    return demo


def metrics_frame(snap):
    """Per-turn metrics table (newest first)."""
    import pandas as pd
    cols = ["turn", "response ms", "compute ms", "reply s", "gen RTF", "forwards", "mode", "reply"]
    rows = []
    for m in reversed(snap.metrics if snap else ()):
        ms = lambda v: None if v is None else round(1000 * v)  # noqa: E731
        rows.append([m.turn, ms(m.response_latency), ms(m.compute_latency),
                     round(m.reply_seconds, 2), None if m.generation_rtf is None
                     else round(m.generation_rtf, 1), m.backbone_forwards, m.mode,
                     m.text + (" (interrupted)" if m.interrupted else "")])
    return pd.DataFrame(rows, columns=cols)


def launch(ctl: LiveController, host: str = "127.0.0.1", port: int = 7860, *,
           share: bool = False, prevent_thread_lock: bool = False, quiet: bool = False):
    """Build and serve the app; returns (blocks, local URL)."""
    demo = build_app(ctl)
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=host, server_port=port, share=share, inbrowser=False,
                prevent_thread_lock=True, quiet=quiet, ssr_mode=False, css=CSS,
                show_error=True, theme=gr.themes.Soft())
    url = demo.local_url
    if not prevent_thread_lock:
        print(f"Tandem live is running at {url} (Ctrl+C to stop)", flush=True)
        try:
            demo.block_thread()
        finally:
            ctl.stop()
    return demo, url
