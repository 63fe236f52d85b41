"""Images from where clients put them: PIL images, bytes, `data:` URLs (base64) and http(s)
URLs — the latter fetched with a timeout and a size cap, and only from the domains the server
lists in `--allowed-media-domains` (no fetching at all when it is unset).

Every failure is a `MediaError` (a ValueError: the server answers 400) saying what was wrong.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmserve import envs

# What Pillow may decode here: common photo formats, nothing exotic.
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})


class MediaError(ValueError):
    """A bad image or URL (the client's fault)."""


@dataclass(frozen=True)
class MediaConfig:
    allowed_domains: tuple[str, ...] = ()  # hosts http(s) images may come from; () = none
    timeout_s: float = 5.0  # whole fetch, connect to last byte
    max_bytes: int = 20 * 1024 * 1024  # larger bodies are refused

    @classmethod
    def from_env(cls, allowed_domains: Sequence[str] | None) -> MediaConfig:
        return cls(
            allowed_domains=tuple(allowed_domains or ()),
            timeout_s=envs.LMSERVE_MEDIA_FETCH_TIMEOUT_S,
            max_bytes=envs.LMSERVE_MAX_MEDIA_BYTES,
        )


def decode_image(data: bytes) -> Any:
    """Encoded image bytes -> an RGB PIL image; a MediaError for anything else."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in IMAGE_FORMATS:
            raise MediaError(
                f"unsupported image format {image.format}; supported: {sorted(IMAGE_FORMATS)}"
            )
        image.load()
        return image.convert("RGB")
    except UnidentifiedImageError:
        raise MediaError(
            f"cannot decode the image: not a supported format ({sorted(IMAGE_FORMATS)})"
        ) from None
    except Image.DecompressionBombError as e:
        raise MediaError(f"the image is too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, MediaError):
            raise
        raise MediaError(f"cannot decode the image (corrupt or truncated): {e}") from None


def to_image(item: Any) -> Any:
    """A PIL image (converted to RGB) or encoded image bytes -> an RGB PIL image."""
    if isinstance(item, bytes | bytearray | memoryview):
        return decode_image(bytes(item))
    if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
        return item if item.mode == "RGB" else item.convert("RGB")
    raise MediaError(f"an image must be a PIL image or encoded bytes, got {type(item).__name__}")


def parse_data_url(url: str) -> bytes:
    """`data:image/png;base64,....` -> the bytes."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("a data URL needs a ',' before its payload")
    media_type = header[len("data:") :].split(";")[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise MediaError(f"unsupported media type {media_type!r} in a data URL (want image/*)")
    if not header.endswith(";base64"):
        raise MediaError("only base64 data URLs are supported (data:image/...;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"the data URL's base64 payload is invalid: {e}") from None


def check_fetch_allowed(url: str, config: MediaConfig) -> None:
    parsed = urllib.parse.urlsplit(url)
    if not config.allowed_domains:
        raise MediaError(
            "this server does not fetch image URLs (start it with --allowed-media-domains); "
            "send the image as a data: URL"
        )
    if parsed.hostname not in config.allowed_domains:
        raise MediaError(
            f"image URL host {parsed.hostname!r} is not in the allowed media domains "
            f"{list(config.allowed_domains)}"
        )


async def fetch_bytes(url: str, config: MediaConfig) -> bytes:
    """GET `url` (an allowed host; no redirects) within the timeout and size cap."""
    import aiohttp

    check_fetch_allowed(url, config)
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise MediaError(f"fetching the image URL gave HTTP {response.status}")
            if (response.content_length or 0) > config.max_bytes:
                raise MediaError(_too_large(response.content_length, config))
            body = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > config.max_bytes:
                    raise MediaError(_too_large(None, config))
            return bytes(body)
    except asyncio.TimeoutError:
        raise MediaError(f"fetching the image URL timed out after {config.timeout_s} s") from None
    except aiohttp.ClientError as e:
        raise MediaError(f"cannot fetch the image URL: {type(e).__name__}: {e}") from None


def _too_large(size: int | None, config: MediaConfig) -> str:
    got = f"{size} bytes" if size is not None else "more"
    return f"the image at the URL is too large ({got}; the limit is {config.max_bytes} bytes)"


async def load_image_url(url: str, config: MediaConfig) -> Any:
    """An image_url part's URL -> an RGB PIL image."""
    if not isinstance(url, str) or not url:
        raise MediaError("image_url.url must be a non-empty string")
    if url.startswith("data:"):
        data = parse_data_url(url)
    elif url.startswith(("http://", "https://")):
        data = await fetch_bytes(url, config)
    else:
        raise MediaError("image_url.url must be a data: URL or an http(s):// URL")
    return await asyncio.to_thread(decode_image, data)


async def load_images(items: Sequence[Any], config: MediaConfig) -> list[Any]:
    """URLs (strings) or images/bytes -> RGB PIL images, URLs fetched concurrently."""

    async def load(item: Any) -> Any:
        return await load_image_url(item, config) if isinstance(item, str) else to_image(item)

    return list(await asyncio.gather(*(load(item) for item in items)))


def load_images_sync(items: Sequence[Any], config: MediaConfig) -> list[Any]:
    """`load_images` from synchronous code (e.g. `LLM.chat`), in a fresh event loop."""
    if not any(isinstance(item, str) for item in items):
        return [to_image(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:  # safe inside a running loop too
        return pool.submit(asyncio.run, load_images(items, config)).result()
