"""Web demo (Gradio): every task of a checkpoint folder in the browser, served on this machine only.

    python scripts/make_tiny_checkpoint.py --task t2v --output_dir tiny_checkpoints/t2v
    python app.py --checkpoint_dir tiny_checkpoints/t2v [--port 7860] [--causal_config configs/self_forcing_dmd.yaml]

Tabs: the folder's text/image-to-video task (T2V, I2V, FLF2V, TI2V, the A14B experts), causal streaming
for T2V folders (frames appear as blocks finish, with the latency to the first frame and the frames
per second), and every extension task (`pipelines/extensions/`) whose `check_folder` accepts the folder.
A request is what `inference.py` runs for a one-line prompt file: the same checks (a bad setting shows
its message in the page), loading, runners, mp4 and JSON sidecar, under
`--output_folder/<time>_<n>/`. Other options of inference.py (--dit_checkpoint, --use_ema, --lora,
--device, --dtype, --offload_model, --t5_cpu, --vae_tiling) apply to every request. Requests run
one at a time, later ones wait in Gradio's queue. Bound to 127.0.0.1 without a share link unless
--host / --share say otherwise.
"""

import argparse
import contextvars
import itertools
import json
import logging
import queue
import re
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import gradio as gr

import inference
from pipelines.extensions import ExtensionTask, extension_tasks
from pipelines.loading import TASK_PRESETS, check_folder, required_files
from pipelines.prompt_file import IMAGE_FIELDS
from pipelines.validation import InvalidInput
from wan.checkpoint import CheckpointError
from wan.configs import get_preset
from wan.model_loading import read_dit_config

log = logging.getLogger("app")

REPO = Path(__file__).resolve().parent
USER_ERRORS = (InvalidInput, CheckpointError, ValueError)
SOLVERS = ["unipc", "dpm++", "euler"]
# System fonts: the default theme fetches Google fonts, which a closed network never answers.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def parse_args(argv=None):
    """(the app's options, the inference.py options passed through to every request)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", required=True)
    parser.add_argument("--task", choices=sorted(TASK_PRESETS),
                        help="the folder's core task (default: read off the folder's DiT config)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on; 0.0.0.0 opens it to the network")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--output_folder", default="outputs/app")
    parser.add_argument("--causal_config", default=str(REPO / "configs" / "self_forcing_dmd.yaml"),
                        help="config of the causal streaming tab (T2V folders)")
    args, passthrough = parser.parse_known_args(argv)
    for own in ("--task", "--checkpoint_dir", "--data_path", "--output_folder", "--config_path"):
        if any(arg.split("=")[0] == own for arg in passthrough):
            parser.error(f"{own} is set by the app for each request")
    return args, passthrough


def core_task(folder):
    """The core task (a key of TASK_PRESETS) whose files a folder holds and whose DiT config has that task's
    model type and input channels; None if there is none. Mixtures of experts are tried first (a diffusers
    A14B folder also passes as a one-expert folder)."""
    for task in sorted(TASK_PRESETS, key=lambda t: not get_preset(TASK_PRESETS[t][0]).is_moe):
        try:
            preset = check_folder(folder, task)
        except USER_ERRORS:
            continue
        dit_config = read_dit_config(required_files(folder, preset)[0]) or {}
        if all(dit_config.get(key, preset.dit[key]) == preset.dit[key] for key in ("model_type", "in_dim")):
            return task
    return None


def folder_extensions(folder):
    """name -> ExtensionTask for the extension tasks whose `check_folder` accepts the folder."""
    found = {}
    for name, task in extension_tasks().items():
        try:
            task.check_folder(Path(folder))
        except (*USER_ERRORS, OSError):
            continue
        found[name] = task
    return found


def prompt_line(prompt, fields):
    """A prompt-file line: the fields (paths, or empty), then the prompt made one line."""
    prompt = " ".join((prompt or "").split())
    if not prompt:
        raise InvalidInput("the prompt is empty; describe the video to generate")
    if prompt.startswith("#"):
        raise InvalidInput("a prompt may not start with '#' (prompt files read such lines as comments)")
    return "\t".join([*(str(f) if f else "" for f in fields), prompt])


def settings_argv(settings):
    """inference.py options of a page's settings; None keeps the default."""
    argv = []
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)] if value else []
        elif value is not None:
            argv.append(f"--{key}={value}")
    return argv


def parse_json_setting(key, text):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInput(f"{key}: '{text}' is not a JSON value ({err.msg}); e.g. [1, 2] or 0.5") from None


def stats_line(frames, first_latency, elapsed):
    """Frames so far, latency to the first frame and frames per second over the generation."""
    first = f" · first frame after {first_latency:.2f} s" if first_latency is not None else ""
    return f"{frames} frames in {elapsed:.2f} s{first} · {frames / max(elapsed, 1e-9):.1f} FPS"


class Demo:
    """What the page runs on: the folder's tasks and the components loaded for them (once per task and DiT
    weights, kept for later requests)."""

    def __init__(self, args, passthrough):
        self.folder = Path(args.checkpoint_dir)
        if not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {self.folder}")
        self.output_folder = Path(args.output_folder).resolve()
        self.passthrough = passthrough
        # A bad pass-through option fails now, not at each request.
        inference.parse_args([*self.base_argv("t2v"), "--data_path", "-", "--output_folder", "-"])
        self.task = args.task or core_task(self.folder)
        self.preset = check_folder(self.folder, self.task) if self.task else None
        self.extensions = folder_extensions(self.folder)
        if self.preset is None and not self.extensions:
            raise CheckpointError(f"{self.folder} holds no complete checkpoint of a core task "
                                  f"({', '.join(TASK_PRESETS)}) "
                                  f"nor of an extension task ({', '.join(extension_tasks()) or 'none registered'})")
        self.causal_config, self.causal_note = self._causal_config(args.causal_config)
        self._components = {}
        self._requests = itertools.count()
        self._busy = threading.Lock()  # one generation at a time, even if a page left mid-stream

    def base_argv(self, task):
        return ["--task", task, "--checkpoint_dir", str(self.folder), *self.passthrough]

    def _causal_config(self, path):
        """(config file of the causal tab, a note for the page); (None, why) when the folder cannot stream."""
        if self.preset is None or self.preset.task != "t2v" or self.preset.is_moe:
            return None, "causal streaming needs a Wan2.1 T2V folder (Self-Forcing / CausVid are distilled from one)"
        config = inference.read_config(path)
        if not inference.is_causal(config):
            raise InvalidInput(f"--causal_config {path} has no num_frame_per_block; give a causal config "
                               "such as configs/self_forcing_dmd.yaml")
        note = f"config `{path}`"
        weights = config.get("generator_ckpt")
        if weights and not Path(weights).exists():
            config.pop("generator_ckpt")
            note += (f"; its distilled weights `{weights}` are not there, so the folder's own DiT runs the "
                     "few-step schedule (expect blurry blocks from a non-distilled model)")
            log.warning("causal tab: %s not found, streaming with the folder's DiT", weights)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        effective = self.output_folder / "causal_config.yaml"
        effective.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return effective, note

    def _load(self, args, preset, config, loras):
        dit_weights = args.dit_checkpoint or config.get("generator_ckpt")
        options = json.dumps(config, sort_keys=True, default=str) if isinstance(preset, ExtensionTask) else None
        key = (args.task, dit_weights, bool(args.use_ema or config.get("use_ema")), options)
        if key not in self._components:
            self._components[key] = inference.load(args, preset, config, loras)
        return self._components[key]

    def run(self, task, line, settings=(), config=None, config_path=None):
        """Runs one prompt-file line through inference.py. Yields dicts: {"frame", "status"} as frames
        are written, then {"video", "sidecar", "status"}. Bad input raises InvalidInput / CheckpointError /
        ValueError (with inference.py's message) before any work."""
        request = self.output_folder / f"{datetime.now():%Y%m%d-%H%M%S}_{next(self._requests):03d}"
        request.mkdir(parents=True)
        (request / "prompt.txt").write_text(line + "\n", encoding="utf-8")
        if config:
            config_path = request / "config.yaml"
            config_path.write_text(json.dumps(config, indent=2))
        argv = [*self.base_argv(task), "--data_path", str(request / "prompt.txt"),
                "--output_folder", str(request / "out"), *settings_argv(dict(settings))]
        try:
            args = inference.parse_args(argv + (["--config_path", str(config_path)] if config_path else []))
        except SystemExit:  # argparse has printed why to the server log
            given = " ".join(settings_argv(dict(settings)))
            raise InvalidInput(f"inference.py does not take these settings: {given}") from None
        preset, config, sample_settings, fps, jobs, loras = inference.validate(args)
        frames, result = queue.Queue(), {}

        def work():
            with self._busy:
                try:
                    components = self._load(args, preset, config, loras)
                    result["start"] = time.perf_counter()
                    inference.generate_all(args, True, preset, config, sample_settings, fps, jobs, loras, components,
                                           on_frame=frames.put)
                except BaseException as err:  # handed to the page's thread, which reports it
                    result["error"] = err
                frames.put(None)

        yield {"status": "Running (the first request also loads the model)…"}
        # The copied context carries Gradio's progress tracker into the worker's tqdm bars.
        threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True).start()
        count, first_latency, finished = 0, None, False
        while not finished:
            batch = [frames.get()]
            while not frames.empty():
                batch.append(frames.get())
            finished = batch[-1] is None
            new = [frame for frame in batch if frame is not None]
            if not new:
                continue
            elapsed = time.perf_counter() - result["start"]
            first_latency = elapsed if first_latency is None else first_latency
            count += len(new)
            yield {"frame": new[-1], "status": f"Streaming: {stats_line(count, first_latency, elapsed)}"}
        if "error" in result:
            raise result["error"]
        elapsed = time.perf_counter() - result["start"]
        sidecar = next((request / "out").glob("*.json"))
        yield {"video": str(sidecar.with_suffix(".mp4")), "sidecar": str(sidecar),
               "status": f"Done: {stats_line(count, first_latency, elapsed)} → `{sidecar.with_suffix('.mp4')}`"}


def markdown_text(text):
    """Text shown verbatim in Markdown (sizes like 832*480 would turn italic)."""
    return re.sub(r"([\\`*_{}\[\]<>#|~])", r"\\\1", str(text))


def page_updates(updates, keys):
    """Runs a request's updates into a tab's outputs: (status, *keys, sidecar file, sidecar JSON); bad input
    and failures end as a message in the status box."""
    def row(status, values=None, sidecar=None):
        values = values or {}
        return (status, *(values.get(k, gr.skip()) for k in keys), sidecar or gr.skip(),
                json.loads(Path(sidecar).read_text()) if sidecar else gr.skip())

    try:
        for update in updates:
            yield row(update["status"], update, update.get("sidecar"))
    except USER_ERRORS as err:
        yield row(f"**Error:** {markdown_text(err)}")
    except Exception as err:  # a bug or out of memory: a message in the page, the traceback in the log
        log.exception("generation failed")
        yield row(f"**Error:** generation failed: {type(err).__name__}: {markdown_text(err)} "
                  "(the server log has the details)")


def result_block(prefix, live_frame=False):
    """The outputs of a tab: status, (live frame,) video, sidecar file, sidecar JSON."""
    status = gr.Markdown(elem_id=f"{prefix}-status")
    outputs = [status]
    with gr.Row():
        if live_frame:
            outputs.append(gr.Image(label="Live: newest frame", elem_id=f"{prefix}-frame", interactive=False,
                                    height=360))
        outputs.append(gr.Video(label="Video", elem_id=f"{prefix}-video", interactive=False, autoplay=True, height=360))
    with gr.Row():
        outputs += [gr.File(label="JSON sidecar", elem_id=f"{prefix}-sidecar-file"),
                    gr.JSON(label="Settings used", elem_id=f"{prefix}-sidecar")]
    return outputs


def image_inputs(task):
    """Image upload boxes of a core task (IMAGE_FIELDS counts): (components, required)."""
    counts = IMAGE_FIELDS[task]
    labels = {0: [], 1: ["Image" + ("" if min(counts) else " (optional)")], 2: ["First frame", "Last frame"]}
    return [gr.Image(type="filepath", label=label, height=200, elem_id=f"video-image-{i}")
            for i, label in enumerate(labels[max(counts)])], min(counts) > 0


def require_images(task_name, images, required):
    if required and not all(images):
        what = "an input image" if len(images) == 1 else "a first and a last frame image"
        raise InvalidInput(f"task {task_name} needs {what}; upload it above")


def video_tab(demo):
    preset = demo.preset
    gr.Markdown(f"**{preset.name}** from `{demo.folder}`: whole-clip generation with classifier-free guidance.")
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="video-prompt")
    images, required = image_inputs(preset.task)
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            size = gr.Dropdown(list(preset.sizes), value=preset.sizes[0], allow_custom_value=True, label="Size (W*H)",
                               elem_id="video-size")
            frame_num = gr.Number(preset.frame_num, precision=0, label="Frames (4n+1)", elem_id="video-frame_num")
            sample_steps = gr.Number(preset.sample_steps, precision=0, label="Sampling steps",
                                     elem_id="video-sample_steps")
            sample_solver = gr.Dropdown(SOLVERS, value=preset.sample_solver, label="Solver")
        with gr.Row():
            sample_shift = gr.Number(preset.sample_shift, label="Shift")
            guide = [preset.guide_scale] if isinstance(preset.guide_scale, (int, float)) else list(preset.guide_scale)
            labels = ["Guidance"] if len(guide) == 1 else ["Guidance (low noise)", "Guidance (high noise)"]
            guides = [gr.Number(value, label=label) for value, label in zip(guide, labels)]
            seed = gr.Number(0, precision=0, label="Seed")
            fps = gr.Number(preset.fps, precision=0, label="FPS of the mp4")
        negative_prompt = gr.Textbox(preset.negative_prompt, label="Negative prompt", lines=2)
    button = gr.Button("Generate", variant="primary", elem_id="video-generate")
    outputs = result_block("video")
    settings = [size, frame_num, sample_steps, sample_solver, sample_shift, seed, fps, negative_prompt]

    # A gr.Progress default in a handler's signature makes Gradio show the run's tqdm bars as its progress bar.
    def generate(prompt, *values, progress=gr.Progress(track_tqdm=True)):
        image_values, values = values[:len(images)], values[len(images):]
        size, frame_num, steps, solver, shift, seed, fps, negative, *guide = values

        def updates():
            require_images(preset.name, image_values, required)
            line = prompt_line(prompt, [i for i in image_values if i])
            yield from demo.run(demo.task, line, dict(
                size=size or None, frame_num=frame_num, sample_steps=steps, sample_solver=solver,
                sample_shift=shift, guide_scale=[g for g in guide if g is not None], negative_prompt=negative,
                seed=seed, fps=fps))
        yield from page_updates(updates(), ["video"])

    button.click(generate, [prompt, *images, *settings, *guides], outputs, concurrency_id="generate",
                 concurrency_limit=1)


def causal_tab(demo):
    config = inference.read_config(demo.causal_config)
    gr.Markdown(f"Block-by-block generation ({demo.causal_note}): blocks of {config['num_frame_per_block']} latent "
                f"frames, steps {config.get('denoising_step_list', config.get('sample_steps'))}. Frames show "
                "as each block is decoded.")
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="causal-prompt")
    image = gr.Image(type="filepath", label="First frame (optional; needs independent_first_frame: true)",
                     height=200, elem_id="causal-image")
    with gr.Row():
        size = gr.Dropdown(list(demo.preset.sizes), value=config.get("size", demo.preset.sizes[0]),
                           allow_custom_value=True, label="Size (W*H)", elem_id="causal-size")
        num_frames = gr.Number(config.get("num_output_frames", 21), precision=0, label="Latent frames")
        seed = gr.Number(0, precision=0, label="Seed")
        fps = gr.Number(demo.preset.fps, precision=0, label="FPS of the mp4")
    button = gr.Button("Stream", variant="primary", elem_id="causal-generate")
    outputs = result_block("causal", live_frame=True)

    def generate(prompt, image, size, num_frames, seed, fps, progress=gr.Progress(track_tqdm=True)):
        def updates():
            line = prompt_line(prompt, [image] if image else [])
            yield from demo.run(demo.task, line, dict(size=size or None, num_output_frames=num_frames, seed=seed,
                                                      fps=fps), config_path=demo.causal_config)
        yield from page_updates(updates(), ["frame", "video"])

    button.click(generate, [prompt, image, size, num_frames, seed, fps], outputs, concurrency_id="generate",
                 concurrency_limit=1, show_progress_on=outputs[0])


def file_input(kind, label, elem_id):
    if kind == "image":
        return gr.Image(type="filepath", label=label, height=200, elem_id=elem_id)
    if kind == "audio":
        return gr.Audio(type="filepath", label=label, elem_id=elem_id)
    if kind == "video":
        return gr.Video(label=label, elem_id=elem_id)
    return gr.File(type="filepath", label=label, elem_id=elem_id)


def setting_input(key, default, elem_id):
    """An input for one of an ExtensionTask's `defaults`, by the default's type (others as JSON text)."""
    if isinstance(default, bool):
        return gr.Checkbox(default, label=key, elem_id=elem_id)
    if isinstance(default, (int, float)):
        return gr.Number(default, precision=0 if isinstance(default, int) else None, label=key, elem_id=elem_id)
    if isinstance(default, str):
        return gr.Textbox(default, label=key, elem_id=elem_id)
    return gr.Textbox(json.dumps(default), label=f"{key} (JSON)", elem_id=elem_id)


def extension_tab(demo, task):
    """A tab built from an ExtensionTask: an upload per field, an input per default."""
    gr.Markdown(f"**{task.name}**: {task.description}")
    prompt = gr.Textbox(label="Prompt", lines=2, elem_id=f"{task.name}-prompt")
    files = [file_input(task.file_kinds.get(name, "image"), name + (" (optional)" if name in task.optional else ""),
                        f"{task.name}-{name}") for name in task.fields]
    defaults = {"seed": 0, "fps": task.fps, **task.defaults}
    with gr.Accordion("Settings", open=True), gr.Row():
        settings = [setting_input(key, value, f"{task.name}-{key}") for key, value in defaults.items()]
    button = gr.Button("Generate", variant="primary", elem_id=f"{task.name}-generate")
    outputs = result_block(task.name)
    setting_keys = set(inference.SETTING_KEYS) | {"fps"}
    json_keys = {key for key, value in defaults.items() if not isinstance(value, (bool, int, float, str))}

    def generate(prompt, *values, progress=gr.Progress(track_tqdm=True)):
        paths, values = values[:len(files)], values[len(files):]

        def updates():
            for name, path in zip(task.fields, paths):
                if not path and name not in task.optional:
                    raise InvalidInput(f"task {task.name} needs its '{name}' input "
                                       f"({task.file_kinds.get(name, 'image')}); upload it above")
            line = prompt_line(prompt, paths)
            parsed = {key: parse_json_setting(key, value) if key in json_keys else value
                      for key, value in zip(defaults, values)}
            options = {k: v for k, v in parsed.items() if k not in setting_keys}
            yield from demo.run(task.name, line, {k: v for k, v in parsed.items() if k in setting_keys},
                                config=options or None)
        yield from page_updates(updates(), ["video"])

    button.click(generate, [prompt, *files, *settings], outputs, concurrency_id="generate", concurrency_limit=1)


def build_page(demo):
    # delete_cache: Gradio's copies of streamed frames and results go after an hour (the outputs stay).
    with gr.Blocks(title="Wan demo", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"# Wan video demo\n`{demo.folder}` · outputs in `{demo.output_folder}`")
        with gr.Tabs():
            if demo.preset is not None:
                with gr.Tab(f"Video ({demo.preset.name})", id="video"):
                    video_tab(demo)
            if demo.causal_config is not None:
                with gr.Tab("Causal streaming", id="causal"):
                    causal_tab(demo)
            for name, task in demo.extensions.items():
                with gr.Tab(name, id=name):
                    extension_tab(demo, task)
    return page.queue(default_concurrency_limit=1)


def launch(args, passthrough, block=True):
    """Builds the page and serves it; returns the Gradio Blocks (call `.close()` when `block` is False)."""
    demo = Demo(args, passthrough)
    page = build_page(demo)
    log.info("serving %s on http://%s:%d%s", demo.folder, args.host, args.port, " (+ share link)" if args.share else "")
    page.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=not block,
                allowed_paths=[str(demo.output_folder)], theme=THEME, ssr_mode=False, quiet=True)
    return page


def main(argv=None):
    args, passthrough = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        launch(args, passthrough)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
