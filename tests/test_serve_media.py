"""Server-mode media rules, on the policy itself: folders, links, redirects, byte and pixel caps."""
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qwenvl.errors import ImageError
from qwenvl.images import ImageLimits
from qwenvl.serve.media import MediaPolicy, MediaRefused, MediaTooLarge

GOLDEN = Path(__file__).parent / "data" / "golden"
SHAPES = GOLDEN / "images" / "shapes_640x480.png"


@pytest.fixture(scope="module")
def web():
    """127.0.0.1: /shapes.png, /redirect?to=URL (302), /slow (never answers)."""
    body = SHAPES.read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/redirect?to="):
                self.send_response(302)
                self.send_header("Location", self.path.split("=", 1)[1])
                self.end_headers()
            elif self.path == "/shapes.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/slow":
                threading.Event().wait(5)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class FirstHopAllowed(MediaPolicy):
    """Private addresses refused, except the test server's own port on the first hop (a stand-in for a
    public host that redirects inward)."""

    def check_host(self, host, port, label):
        if port == self.__dict__.setdefault("_port", port) and not self.__dict__.get("_used"):
            self.__dict__["_used"] = True
            return "127.0.0.1"
        return super().check_host(host, port, label)


def test_a_redirect_to_a_private_address_is_checked_again(web):
    policy = FirstHopAllowed()
    with pytest.raises(MediaRefused, match="private, loopback"):
        policy.load(f"{web}/redirect?to=http://127.0.0.2:{web.rsplit(':', 1)[1]}/shapes.png")


def test_redirects_to_other_schemes_are_refused(web):
    with pytest.raises(MediaRefused, match="not http"):
        MediaPolicy(allow_private_urls=True).load(f"{web}/redirect?to=file:///etc/passwd")


def test_download_limits(web):
    assert MediaPolicy(allow_private_urls=True).load(f"{web}/shapes.png").size == (640, 480)
    with pytest.raises(MediaTooLarge):
        MediaPolicy(ImageLimits(max_bytes=1000), allow_private_urls=True).load(f"{web}/shapes.png")
    with pytest.raises(MediaTooLarge):
        MediaPolicy(ImageLimits(max_pixels=1000), allow_private_urls=True).load(f"{web}/shapes.png")
    with pytest.raises(ImageError, match="not done within"):
        MediaPolicy(ImageLimits(timeout_s=0.5), allow_private_urls=True).load(f"{web}/slow")


def test_local_files_only_under_the_allowed_folder_after_links(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(SHAPES.read_bytes())
    (allowed / "escape.png").symlink_to(SHAPES)  # a link out of the folder
    (tmp_path / "media2").mkdir()  # a sibling whose name starts like the folder's
    (tmp_path / "media2" / "x.png").write_bytes(SHAPES.read_bytes())
    policy = MediaPolicy(allowed_local_media_path=str(allowed))
    assert policy.load(str(allowed / "ok.png")).size == (640, 480)
    assert policy.load(f"file://{allowed / 'ok.png'}").size == (640, 480)
    for path in (allowed / "escape.png", tmp_path / "media2" / "x.png", allowed / ".." / "media2" / "x.png"):
        with pytest.raises(MediaRefused, match="not under the allowed folder"):
            policy.load(str(path))
    with pytest.raises(MediaRefused, match="local files are not served"):
        MediaPolicy().load(str(allowed / "ok.png"))


@pytest.mark.parametrize("address", ["10.0.0.1", "192.168.1.1", "172.16.0.1", "100.64.0.1", "0.0.0.0",
                                     "224.0.0.1", "::1", "fe80::1", "::ffff:127.0.0.1", "fc00::1"])
def test_private_address_classes_are_refused(address):
    with pytest.raises(MediaRefused):
        MediaPolicy().check_host(address, 80, "x")
