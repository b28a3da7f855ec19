"""The desktop live-conversation app (Gradio 6, localhost): what the agent sees (the camera
or the demo-world scene, shown and played with its beeps, a new one on a button or timer),
what the shipped model knows, transcript, latency and attention plots, start/stop, model
and generation mode; a browser-devices tab (microphone and webcam streamed from the
browser, the reply streamed back) and a demo-replay tab. The page polls the active
conversation's state with gr.Timers; handlers live in `app.gradio_handlers.LiveController`.
Every button's event has an api_name, so tests drive the page's wiring with gradio_client.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # no network calls from the app

import gradio as gr  # noqa: E402

from .demo_scene import world_markdown  # noqa: E402
from .gradio_handlers import CAMERA, SCENE, SOURCES, LiveController  # noqa: E402

POLL_SECONDS = 0.5
PREVIEW_SECONDS = 0.2           # the picture (a beeping shape pulses for 0.2-0.3 s)
WEBCAM_MIRROR = True            # the webcam preview is a mirror (frames are un-mirrored)
SCENE_EVERY_MAX = 120           # "new scene every" slider's top (s; 0 = only the button)
MIC_CHUNK_SECONDS = 0.1         # browser microphone chunk (Gradio's recorder sends 0.1 s)
WEBCAM = {"video": {"width": {"ideal": 640}, "height": {"ideal": 480}}}  # enough for the model
LATENCY_COLORS = {"response": "#e4572e", "compute": "#17a2b8"}
ATTENTION_COLORS = {"video": "#6f42c1", "audio": "#f0ad4e"}
# After "Start browser session": start the microphone (and the webcam when the agent sees
# the camera) as if the user clicked their buttons; "Stop" stops them. The status line
# still says what to click should a browser refuse.
DEVICES_JS = """
async (source) => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const button = (id, text) => [...document.querySelectorAll(`#${id} button`)]
      .find((b) => b.innerText.trim() === text);
  const press = async (id, text, ms) => {
    for (let t = 0; t < ms; t += 100) {
      const b = button(id, text);
      if (b) { b.click(); return true; }
      await sleep(100);
    }
    return false;
  };
  if (source === "%s") {
    if (!button("tandem-webcam", "Record"))
      await press("tandem-webcam", "Click to Access Webcam", 1000);
    await press("tandem-webcam", "Record", 5000);
  }
  await press("tandem-mic", "Record", 2000);
  return [];
}
"""
STOP_DEVICES_JS = """
() => {
  for (const id of ["tandem-mic", "tandem-webcam"])
    for (const b of document.querySelectorAll(`#${id} button`))
      if (b.innerText.trim() === "Stop") b.click();
  return [];
}
"""
CSS = """
#tandem-notice {border-left: 4px solid #e8a317; padding: 0 12px; background: #fff8e6;}
#tandem-notice h3 {margin: 4px 0;}
#tandem-notice:empty {display: none;}
"""


def build_app(ctl: LiveController) -> gr.Blocks:
    """The page, wired to `ctl`."""
    from .frames import latency_legend       # the latency plot's caption
    with gr.Blocks(title="Tandem live") as demo:
        gr.Markdown("## Tandem — live conversation\nTalk to the agent: it sees the camera or "
                    "the demo-world scene, hears you and the scene, and answers out loud.")
        with gr.Accordion("What the shipped model knows, and the questions it understands",
                          open=ctl.default_source == SCENE):
            gr.Markdown(world_markdown())
        notice = gr.Markdown(ctl.notices_markdown(), elem_id="tandem-notice")
        status = gr.Markdown(ctl.status_markdown(None), elem_id="tandem-status")
        with gr.Row():
            with gr.Column(scale=2):
                source = gr.Radio(list(SOURCES), value=ctl.default_source,
                                  label="The agent sees (applies at Start)")
                preview = gr.Image(label="What the agent sees", type="numpy",
                                   interactive=False, height=260, format="jpeg")
                scene_md = gr.Markdown(ctl.scene_markdown())
                with gr.Row(equal_height=True):
                    new_scene = gr.Button("New scene", scale=1)
                    every = gr.Slider(0, SCENE_EVERY_MAX, step=5, scale=2,
                                      value=ctl.scene_options.scene_seconds,
                                      label="New scene every (s; 0 = only on the button; "
                                            "applies at Start)")
                with gr.Row(equal_height=True):
                    model = gr.Dropdown(ctl.models, value=ctl.default_model, label="Model",
                                        scale=3)
                    mode = gr.Radio(["vanilla", "mctp"], value=ctl.options.mode, scale=2,
                                    label="Generation")
                with gr.Tabs():
                    with gr.Tab("This computer"):
                        gr.Markdown("This machine's microphone and speaker (and camera, "
                                    "when the agent sees the camera).")
                        with gr.Row():
                            start = gr.Button("▶ Start", variant="primary")
                            stop = gr.Button("■ Stop")
                            interrupt = gr.Button("Interrupt")
                        scene_sound = gr.Audio(streaming=True, autoplay=True, interactive=False,
                                               label="Scene sound (the beeps)")
                    with gr.Tab("Browser devices"):
                        gr.Markdown("When the app runs on another machine: your browser's "
                                    "microphone (and webcam, when the agent sees the camera) "
                                    "stream to the agent; its voice (and the scene's beeps) "
                                    "stream back. Press Start, then follow the status line.")
                        with gr.Row():
                            b_start = gr.Button("▶ Start browser session", variant="primary")
                            b_stop = gr.Button("■ Stop", elem_id="tandem-browser-stop")
                            b_interrupt = gr.Button("Interrupt")
                        mic = gr.Audio(sources=["microphone"], streaming=True, type="numpy",
                                       label="Microphone", elem_id="tandem-mic")
                        webcam = gr.Image(sources=["webcam"], streaming=True, type="numpy",
                                          label="Webcam", height=200, elem_id="tandem-webcam",
                                          visible=ctl.default_source == CAMERA,
                                          webcam_options=gr.WebcamOptions(
                                              mirror=WEBCAM_MIRROR, constraints=WEBCAM))
                        voice = gr.Audio(streaming=True, autoplay=True, interactive=False,
                                         label="Agent's voice", elem_id="tandem-voice")
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
                                          y_title="ms", color_map=LATENCY_COLORS,
                                          caption=latency_legend())
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

        source.change(lambda src: gr.update(visible=src == CAMERA), source, webcam,
                      show_progress="hidden")

        def interrupt_reply() -> str:
            if ctl.session is not None:
                ctl.session.interrupt()
            return ctl.status_markdown(ctl.snapshot())

        shown = {"scene": None, "preview": None}

        def scene_view():          # what changed of the picture and the scene's text
            text, (key, image) = ctl.scene_markdown(), ctl.preview_frame()
            out = (gr.skip() if text == shown["scene"] else text,
                   gr.skip() if key == shown["preview"] else image)
            shown.update(scene=text, preview=key)
            return out

        def tick():
            status_, notice_, _, *rest = refresh()
            return status_, notice_, *rest

        start.click(ctl.start_local, [model, mode, source, every], status, api_name="start").then(
            refresh, None, views).then(ctl.scene_sound, None, scene_sound,
                                       concurrency_limit=None, show_progress="hidden")
        b_stop.click(None, None, None, js=STOP_DEVICES_JS)
        stopped = [stop.click(ctl.stop, None, status, api_name="stop"),
                   b_stop.click(ctl.stop, None, status, api_name="stop_browser"),
                   d_stop.click(ctl.stop, None, status, api_name="stop_replay")]
        interrupt.click(interrupt_reply, None, status, api_name="interrupt")
        b_interrupt.click(interrupt_reply, None, status, api_name="interrupt_browser")
        new_scene.click(ctl.new_scene, None, scene_md, api_name="new_scene")
        b_started = b_start.click(ctl.start_browser, [model, mode, source, every], status,
                                  api_name="start_browser")
        b_started.then(None, source, None, js=DEVICES_JS % CAMERA)
        b_started.then(ctl.browser_voice, None, voice, concurrency_limit=None,
                       show_progress="hidden")
        d_start.click(ctl.start_demo, [session, model, mode], status, api_name="replay")
        for ev in stopped:      # a stopped session's streams end at once
            ev.then(lambda: (None, None), None, [voice, scene_sound], show_progress="hidden")
        webcam.stream(ctl.browser_frame, webcam, None, stream_every=0.2,
                      concurrency_limit=4, show_progress="hidden")
        mic.stream(ctl.browser_mic, mic, None, stream_every=MIC_CHUNK_SECONDS,
                   concurrency_limit=4, show_progress="hidden")
        timer = gr.Timer(POLL_SECONDS)
        timer.tick(tick, None, [status, notice, chat, latency, attention],
                   show_progress="hidden", api_name="poll")
        gr.Timer(PREVIEW_SECONDS).tick(scene_view, None, [scene_md, preview],
                                       show_progress="hidden", api_name="scene_view")
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
        def page_loaded():
            shown.update(scene=None, preview=None)      # a fresh page gets everything
            *rest, lat, att = ctl.page_loaded()
            return (*rest, None if lat.empty else lat, None if att.empty else att)

        demo.load(page_loaded, None, views, api_name="page_loaded")
    return demo


def metrics_frame(snap):
    """Per-turn metrics table (newest first)."""
    import pandas as pd
    cols = ["turn", "response ms", "compute ms", "ended by", "discarded", "reply s", "gen RTF",
            "forwards", "mode", "reply"]
    rows = []
    for m in reversed(snap.metrics if snap else ()):
        ms = lambda v: None if v is None else round(1000 * v)  # noqa: E731
        rows.append([m.turn, ms(m.response_latency), ms(m.compute_latency),
                     m.turn_end.replace("_", " "), m.discarded_starts, round(m.reply_seconds, 2), None if m.generation_rtf is None
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
