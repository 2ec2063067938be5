"""The web demo (app.py) end to end in a real headless Chromium, on a tiny T2V checkpoint.

The app is served on a free localhost port and driven through its page: a text-to-video clip, a
causal stream whose frames must reach the page before the stream ends, the generic tab of an
extension task registered here, bad input shown as a message, and a second request queued while the
first runs. Screenshots go to the test's temp folder. Needs gradio, playwright (`pip install -e
".[test,app]"`) and Debian's chromium (`apt-get install chromium`); Playwright never downloads a browser.
Without them the tests skip locally and fail in CI (CI set), as .ci/run installs them.
"""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from pipelines.tiny_checkpoint import make_tiny_checkpoint

from conftest import mp4_frames

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "prompts" / "images" / "first_frame.png"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]
TIMEOUT_MS = 60_000
# blocks of 2 latent frames, 2 steps each: 5 latent frames -> blocks [2, 2, 1] -> 5 + 8 + 4 pixel frames
CAUSAL_CONFIG = {"denoising_step_list": [1000, 500], "warp_denoising_step": True, "timestep_shift": 5.0,
                 "context_noise": 0, "num_frame_per_block": 2, "independent_first_frame": False,
                 "num_output_frames": 5, "model_kwargs": {"local_attn_size": -1, "sink_size": 0}}
CAUSAL_FRAMES = 17


def require(found, what):
    """Skips locally without the browser stack; in CI (which installs it) its absence is a failure."""
    if found:
        return
    message = f"{what} is missing: run `apt-get install -y chromium && pip install -e '.[test,app]'` (see .ci/run)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def chromium_path():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    require(path, "the system Chromium (Debian package `chromium`)")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tint_task(name, accepts):
    """A tiny ExtensionTask: one image field and one option of its own (`tint`), writing the image tinted."""
    from pipelines.extensions import ExtensionTask
    from pipelines.validation import check_image_file, parse_size
    from pipelines.video_io import image_to_tensor, resize_cover, write_frames
    from wan.checkpoint import CheckpointError

    class TintPipeline:
        dits = []

        def __init__(self, config):
            self.tint = config["tint"]

        def run(self, job, settings, seed, writer):
            width, height = parse_size(settings.size)
            frame = resize_cover(image_to_tensor(check_image_file(job.inputs["image"])), width, height) * self.tint
            frames, height, width = write_frames(writer, frame[:, None].expand(-1, settings.frame_num, -1, -1))
            return {"frames": frames, "height": height, "width": width, "tint": self.tint, "seed": seed}

    def check_folder(folder):
        if not accepts:
            raise CheckpointError(f"{folder} is not a {name} checkpoint")

    return ExtensionTask(name=name, description="tints the image (a test task)", fields=("image",),
                         check_folder=check_folder, load=lambda folder, args, config: TintPipeline(config),
                         file_kinds={"image": "image"}, defaults={"size": "64*64", "frame_num": 5, "tint": 0.5})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free localhost port: (url, output folder)."""
    require(all(_importable(m) for m in ("gradio", "playwright")), "gradio or playwright")
    import app
    from pipelines import extensions

    folder = tmp_path_factory.mktemp("app")
    checkpoint = make_tiny_checkpoint("t2v", folder / "t2v")
    (folder / "causal.yaml").write_text(json.dumps(CAUSAL_CONFIG))
    port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(extensions._TASKS, "tiny_tint", tint_task("tiny_tint", accepts=True))
        patch.setitem(extensions._TASKS, "tiny_other", tint_task("tiny_other", accepts=False))
        args, passthrough = app.parse_args(["--checkpoint_dir", str(checkpoint), "--port", str(port),
                                            "--output_folder", str(folder / "out"),
                                            "--causal_config", str(folder / "causal.yaml"), "--device", "cpu"])
        page = app.launch(args, passthrough, block=False)
        try:
            assert page.local_url.startswith("http://127.0.0.1:") and page.share_url is None
            yield page.local_url, folder / "out"
        finally:
            page.close()


def _importable(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, server):
    pages = []

    def open_page(tab):
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server[0])
        page.get_by_role("tab", name=tab).click()
        pages.append(page)
        return page

    yield open_page
    for page in pages:
        page.close()


def status(page, prefix):
    return page.locator(f"#{prefix}-status").inner_text()


def wait_for_status(page, prefix, text):
    page.wait_for_function("([id, text]) => document.querySelector(id).innerText.includes(text)",
                           arg=[f"#{prefix}-status", text])
    return status(page, prefix)


def set_dropdown(page, elem_id, value):
    box = page.locator(f"#{elem_id} input")
    box.fill(value)
    box.press("Enter")
    box.blur()


def test_app_browser_text_to_video_clip_and_bad_input(open_page, server, tmp_path):
    page = open_page("Video (t2v-1.3B)")
    button = page.locator("#video-generate")

    button.click()  # empty prompt
    message = wait_for_status(page, "video", "Error")
    assert "the prompt is empty" in message and "Traceback" not in page.content()

    page.locator("#video-prompt textarea").fill("A red kite over a beach.")
    set_dropdown(page, "video-size", "832*480")
    button.click()
    message = wait_for_status(page, "video", "832*480")
    assert "size 832*480 is not supported by t2v-1.3B; supported sizes (W*H): 64*64, 96*64" in message
    page.screenshot(path=tmp_path / "bad_size.png", full_page=True)

    set_dropdown(page, "video-size", "96*64")
    page.locator("#video-frame_num input").fill("5")
    page.locator("#video-sample_steps input").fill("2")
    button.click()
    page.wait_for_selector("#video-video video")
    done = wait_for_status(page, "video", "Done")
    page.screenshot(path=tmp_path / "t2v.png", full_page=True)
    assert "5 frames" in done
    video = next(server[1].glob("*/out/*red_kite*.mp4"))
    used = json.loads(video.with_suffix(".json").read_text())
    assert (used["size"], used["frame_num"], used["sample_steps"], used["frames"]) == ("96*64", 5, 2, 5)
    assert [frame.shape for frame in mp4_frames(video)] == [(64, 96, 3)] * 5
    assert '"96*64"' in page.locator("#video-sidecar").inner_text()  # the sidecar shown in the page


STREAM_WATCH = """() => {
  const seen = window.streamSeen = {frames: [], video: null};
  const statusText = () => document.querySelector('#causal-status').innerText;
  new MutationObserver(() => {
    const img = document.querySelector('#causal-frame img');
    const src = img && img.getAttribute('src');
    if (src && (!seen.frames.length || seen.frames[seen.frames.length - 1].src !== src))
      seen.frames.push({t: performance.now(), src, status: statusText()});
    if (!seen.video && document.querySelector('#causal-video video'))
      seen.video = {t: performance.now(), status: statusText()};
  }).observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
}"""


def test_app_browser_causal_stream_shows_frames_before_the_end_and_queues_a_second_request(open_page, server,
                                                                                          tmp_path):
    page, other = open_page("Causal streaming"), open_page("tiny_tint")
    other.locator("#tiny_tint-prompt textarea").fill("A queued request.")
    other.set_input_files("#tiny_tint-image input[type=file]", IMAGE)
    other.locator("#tiny_tint-image img").wait_for()
    page.locator("#causal-prompt textarea").fill("A paper boat on a pond.")
    page.evaluate(STREAM_WATCH)
    page.locator("#causal-generate").click()
    page.wait_for_function("document.querySelector('#causal-status').innerText.includes('Running')")
    other.locator("#tiny_tint-generate").click()  # while the stream runs

    page.wait_for_selector("#causal-video video")
    done = wait_for_status(page, "causal", "Done")
    page.screenshot(path=tmp_path / "causal.png", full_page=True)
    seen = page.evaluate("window.streamSeen")
    first = seen["frames"][0]
    assert first["t"] < seen["video"]["t"], seen
    assert "Done" not in first["status"] and len(seen["frames"]) >= 2, seen  # frames while it still ran
    assert f"{CAUSAL_FRAMES} frames" in done and "FPS" in done and "first frame after" in done
    video = next(server[1].glob("*/out/*paper_boat*.mp4"))
    assert len(mp4_frames(video)) == CAUSAL_FRAMES
    assert json.loads(video.with_suffix(".json").read_text())["num_frame_per_block"] == 2

    other.wait_for_selector("#tiny_tint-video video")
    wait_for_status(other, "tiny_tint", "Done")
    queued = next(server[1].glob("*/out/*queued_request*.mp4"))
    # the second request's handler (which writes its prompt file) ran once the stream was done
    assert (queued.parents[1] / "prompt.txt").stat().st_mtime >= video.stat().st_mtime

    page.set_input_files("#causal-image input[type=file]", IMAGE)  # this config has no first-frame block
    page.locator("#causal-image img").wait_for()
    page.locator("#causal-generate").click()
    message = wait_for_status(page, "causal", "Error")
    assert "an image prompt needs a config with independent_first_frame: true" in message


def test_app_browser_extension_tab_from_its_fields(open_page, server, tmp_path):
    page = open_page("tiny_tint")
    assert page.get_by_role("tab", name="tiny_other").count() == 0  # its check_folder refuses the folder
    page.locator("#tiny_tint-prompt textarea").fill("A tinted lake.")
    page.locator("#tiny_tint-generate").click()
    message = wait_for_status(page, "tiny_tint", "Error")
    assert "task tiny_tint needs its 'image' input (image); upload it above" in message

    page.set_input_files("#tiny_tint-image input[type=file]", IMAGE)
    page.locator("#tiny_tint-image img").wait_for()
    page.locator("#tiny_tint-tint input").fill("0.25")
    page.locator("#tiny_tint-generate").click()
    page.wait_for_selector("#tiny_tint-video video")
    wait_for_status(page, "tiny_tint", "Done")
    page.screenshot(path=tmp_path / "extension.png", full_page=True)
    video = next(server[1].glob("*/out/*tinted_lake*.mp4"))
    used = json.loads(video.with_suffix(".json").read_text())
    assert used["tint"] == 0.25 and used["task"] == "tiny_tint" and used["frames"] == 5
    assert len(mp4_frames(video)) == 5


@pytest.mark.parametrize("task", ["i2v-A14B", "ti2v"])
def test_app_finds_the_folder_task_and_runs_it_like_inference(tmp_path, task):
    """The video tab's request path without a browser: MoE (two guidance scales, an image) and TI2V."""
    require(_importable("gradio"), "gradio")
    import app

    folder = make_tiny_checkpoint(task, tmp_path / task)
    assert app.core_task(folder) == task
    args, passthrough = app.parse_args(["--checkpoint_dir", str(folder), "--output_folder", str(tmp_path / "out")])
    assert (args.host, args.share) == ("127.0.0.1", False)
    demo = app.Demo(args, passthrough)
    assert demo.task == task and demo.causal_config is None and "T2V" in demo.causal_note
    guide = [2.0, 6.0] if task == "i2v-A14B" else [4.0]
    updates = list(demo.run(task, app.prompt_line("A fox\nin snow.", [IMAGE] if task == "i2v-A14B" else []),
                            {"frame_num": 5, "sample_steps": 2, "guide_scale": guide, "seed": 3}))
    used = json.loads(Path(updates[-1]["sidecar"]).read_text())
    assert used["prompt"] == "A fox in snow." and used["guide_scale"] == (guide if len(guide) == 2 else guide * 2)
    assert (used["frame_num"], used["sample_steps"], used["seed"]) == (5, 2, 3)
    assert sum(1 for u in updates if "frame" in u) >= 1 and len(mp4_frames(updates[-1]["video"])) == 5

    with pytest.raises(app.InvalidInput, match="frame_num must be 4n\\+1"):
        next(iter(demo.run(task, app.prompt_line("A fox.", []), {"frame_num": 6})))
