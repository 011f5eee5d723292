"""serve.py live on 127.0.0.1: the official openai client, concurrent clients, every refusal."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from checkpoint import save_checkpoint
from config import Config, config_to_dict
from model import GPT
from tests.conftest import tiny_model_config
from tokenizer import CharTokenizer

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"
ALPHABET = "\n !?,.abcdefghijklmnopqrstuvwxyzé🙂"  # two- and four-byte characters too


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_checkpoint(path: Path, chat: bool) -> Path:
    tokenizer = CharTokenizer(ALPHABET, with_specials=chat)
    cfg = tiny_model_config(block_size=64, vocab_size=64, n_embd=32, n_head=4)
    torch.manual_seed(0)
    save_checkpoint({"model": GPT(cfg).state_dict(), "config": config_to_dict(Config(model=cfg)),
                     "tokenizer": tokenizer.to_dict(), "step": 0}, path)
    return path


class Server:
    """serve.py in a subprocess, up once /health answers."""

    def __init__(self, checkpoint: Path, *flags: str):
        self.checkpoint = checkpoint
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), str(checkpoint), "--port",
                                         str(self.port), "--device", "cpu", *flags], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve.py exited: {self.process.communicate()}")
            try:
                self.get("/health")
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("serve.py did not answer /health within 60 s")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self) -> tuple[int, str, str]:
        self.process.send_signal(signal.SIGTERM)
        out, err = self.process.communicate(timeout=30)
        return self.process.returncode, out, err


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    server = Server(write_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt.pt", chat=True),
                    "--api_key", KEY, "--max_tokens", "100000", "--max_messages", "4", "--max_chars", "200",
                    "--max_body_bytes", "20000")
    yield server
    code, out, err = server.stop()
    assert code == 0 and "server stopped" in out and "Traceback" not in err, err


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server.url + "/v1", api_key=KEY, max_retries=0)


def test_chat_and_completions_through_the_openai_client_streamed_as_not(client):
    model = client.models.list().data[0].id
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=40)
    streamed = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=40,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    text = client.completions.create(model=model, prompt="abc", temperature=0, max_tokens=30)
    streamed_text = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="abc", temperature=0, max_tokens=30, stream=True))
    assert streamed_text == text.choices[0].text and text.usage.prompt_tokens == 3
    assert text.choices[0].finish_reason in ("length", "stop")


def test_seed_repeats_a_sample_and_stop_cuts_it(client):
    ask = dict(model="m", prompt="hi", temperature=1.5, max_tokens=40, seed=11)
    first, again = (client.completions.create(**ask).choices[0].text for _ in range(2))
    assert first == again and len(first) > 3
    stop = first[2:4]
    cut = client.completions.create(**ask, stop=[stop]).choices[0]
    assert cut.text == first[: first.index(stop)] and cut.finish_reason == "stop"


def test_every_streamed_chunk_holds_whole_characters(chat_server):
    status, body = None, None
    request = urllib.request.Request(chat_server.url + "/v1/completions", method="POST", data=json.dumps(
        {"prompt": "é🙂", "max_tokens": 300, "temperature": 2, "stream": True, "seed": 3}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        status, body = response.status, response.read()
    events = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
    assert status == 200 and events[-1] == b"[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]  # each event decodes as UTF-8 text
    assert "\ufffd" not in "".join(texts) and len(texts) > 10


def test_eight_concurrent_clients_each_get_their_own_answer(client):
    expected = {n: client.completions.create(model="m", prompt="abcdefgh"[n] + " abc", temperature=1.5, seed=n,
                                            max_tokens=25)
                .choices[0].text for n in range(8)}
    answers: dict[int, str] = {}

    def ask(n: int) -> None:
        answers[n] = client.completions.create(model="m", prompt="abcdefgh"[n] + " abc", temperature=1.5,
                                               seed=n, max_tokens=25).choices[0].text

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == expected and len(set(expected.values())) > 1


def test_a_batch_serves_eight_clients_together_with_the_answers_they_get_one_at_a_time(chat_server):
    batched, alone = (Server(chat_server.checkpoint, "--api_key", KEY, "--batch", size) for size in ("4", "1"))
    try:
        batch_client, client = (openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
                                for server in (batched, alone))
        ask = {"prompt": "", "temperature": 1.2, "max_tokens": 150}  # 150 tokens > block_size 64: rows slide
        expected = {n: client.completions.create(model="m", **{**ask, "prompt": "abcdefgh"[n] * (n + 1)}, seed=n)
                    .choices[0].text for n in range(8)}
        answers: dict[int, str] = {}
        busiest = [0]

        def request(n: int) -> None:
            answers[n] = batch_client.completions.create(model="m", **{**ask, "prompt": "abcdefgh"[n] * (n + 1)},
                                                         seed=n).choices[0].text

        threads = [threading.Thread(target=request, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            busiest[0] = max(busiest[0], batched.get("/health")["generating"])
            time.sleep(0.005)
        assert answers == expected and len(set(expected.values())) > 1
        assert busiest[0] >= 2  # requests were decoded together
    finally:
        stopped = [server.stop() for server in (batched, alone)]
    assert all(code == 0 and "Traceback" not in err for code, _, err in stopped), stopped


def test_a_client_that_hangs_up_frees_the_worker(chat_server):
    body = json.dumps({"prompt": "abc", "max_tokens": 100000, "stream": True, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", chat_server.port)) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"200" in connection.recv(100)
        deadline = time.time() + 10  # the headers go out before the worker takes the job
        while not chat_server.get("/health")["generating"] and time.time() < deadline:
            time.sleep(0.02)
        assert chat_server.get("/health")["generating"] == 1
    deadline = time.time() + 10  # 100,000 tokens would take minutes
    while chat_server.get("/health")["generating"] and time.time() < deadline:
        time.sleep(0.05)
    health = chat_server.get("/health")
    assert (health["status"], health["chat"], health["generating"], health["waiting"]) == ("ok", True, 0, 0)


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}), 400, "role"),
    ("/v1/chat/completions", json.dumps({"messages": []}), 400, "non-empty"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}),
     400, "'temperature' must be between 0 and 2"),
    ("/v1/completions", json.dumps({"prompt": "a", "temperature": -0.1}), 400, "temperature"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 0}), 400, "'max_tokens' must be a positive"),
    ("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 100001}), 400, "limit of 100000"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "a"}] * 5}), 400,
     "more than this server's limit of 4"),
    ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "a" * 201}]}), 400,
     "201 characters"),
    ("/v1/completions", json.dumps({"prompt": "a" * 30000}), 413, "limit of 20,000"),
]


@pytest.mark.parametrize("path,body,status,words", BAD_REQUESTS, ids=[row[3] for row in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_with_their_status(chat_server, path, body, status, words):
    got, reply = chat_server.post(path, body if isinstance(body, bytes) else body.encode())
    assert got == status and words in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}


def test_keys_routes_and_the_server_surviving_it_all(chat_server):
    ask = json.dumps({"prompt": "a", "max_tokens": 2}).encode()
    assert chat_server.post("/v1/completions", ask, key=None)[0] == 401
    status, reply = chat_server.post("/v1/completions", ask, key="wrong")
    assert status == 401 and "API key is wrong" in reply["error"]["message"]
    status, reply = chat_server.post("/v1/nothing", ask)
    assert status == 404 and "no such route" in reply["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as missing:
        chat_server.get("/nowhere")
    assert missing.value.code == 404
    assert chat_server.post("/v1/completions", ask)[0] == 200  # still serving
    with urllib.request.urlopen(chat_server.url + "/", timeout=10) as page:
        html = page.read().decode()
    assert "/v1/chat/completions" in html and "http" not in html.replace("http://", "").split("<script>")[0]


def test_a_base_model_serves_completions_and_refuses_chat(tmp_path):
    server = Server(write_checkpoint(tmp_path / "base.pt", chat=False), "--host", "0.0.0.0")
    try:
        status, reply = server.post("/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": "hi"}]}).encode(), key=None)
        assert status == 400 and "no chat template" in reply["error"]["message"]
        status, reply = server.post("/v1/completions", json.dumps({"prompt": "ab", "max_tokens": 5}).encode(),
                                    key=None)
        assert status == 200 and reply["usage"]["completion_tokens"] <= 5
    finally:
        code, out, err = server.stop()
    assert code == 0 and "without --api_key" in err and "completions only" in out


def test_a_port_in_use_is_one_line_before_loading(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, str(ROOT / "serve.py"), str(tmp_path / "none.pt"), "--port", str(port)],
                              cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ})
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def chromium_driver():
    """Debian's chromium and chromedriver, headless (.ci/run installs them); None where absent."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not (binary.exists() and driver.exists()):
        if os.environ.get("CI") == "true":
            raise AssertionError("CI must have chromium and chromedriver: .ci/run installs them")
        pytest.skip("no /usr/bin/chromium and /usr/bin/chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1000,700"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(driver)), options=options)


def test_the_web_page_streams_a_reply_and_regenerates_it(chat_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium_driver()
    try:
        browser.get(chat_server.url + "/")
        browser.find_element(By.ID, "api_key").send_keys(KEY)
        temperature = browser.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")  # greedy: this untrained model's reply is long, not cut by <|im_end|>
        browser.execute_script("""window.updates = 0; new MutationObserver(() => window.updates++)
            .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});""")
        browser.find_element(By.ID, "message").send_keys("tell me a story", Keys.ENTER)
        wait = WebDriverWait(browser, 30)
        done = "return [...document.querySelectorAll('.assistant')].filter(b => b.dataset.done).length"
        wait.until(lambda b: b.execute_script(done) == 1)
        first = browser.find_element(By.CSS_SELECTOR, ".assistant").text
        assert browser.find_element(By.CSS_SELECTOR, ".user").text == "tell me a story"
        assert first and browser.execute_script("return window.updates") > 3  # pieces came one by one
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
        browser.save_screenshot(str(tmp_path / "chat_page.png"))
        browser.execute_script("window.updates = 0")
        browser.find_element(By.ID, "regenerate").click()
        wait.until(lambda b: b.execute_script(done) == 1 and b.find_element(By.ID, "regenerate").is_enabled())
        replies = browser.find_elements(By.CSS_SELECTOR, ".assistant")
        assert len(replies) == 1 and replies[0].text == first  # the same turn asked again (greedy: same reply)
        assert browser.execute_script("return window.updates") > 3  # and streamed again
        browser.find_element(By.ID, "new_chat").click()
        assert not browser.find_elements(By.CSS_SELECTOR, ".turn")
    finally:
        browser.quit()
