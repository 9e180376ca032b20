"""Encoding of outputs in the contract's output formats: still images, and videos (MP4, WebP, GIF)."""

from __future__ import annotations

import io
from typing import Any

from service.contract import IMAGE_FORMATS, OUTPUT_FORMATS, VIDEO_FORMATS

# PIL format name and options per output format. PNG at the lowest compression level: the
# bytes go once through Redis to one client, and level 1 costs a fraction of the default's time.
_PIL_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "png": ("PNG", {"compress_level": 1}), "jpeg": ("JPEG", {"quality": 95}), "webp": ("WEBP", {"quality": 95})}
assert set(_PIL_FORMATS) == set(IMAGE_FORMATS) and set(IMAGE_FORMATS) | set(VIDEO_FORMATS) == set(OUTPUT_FORMATS), \
    "every output format needs an encoder"


def encode_image(image: Any, fmt: str) -> bytes:
    name, opts = _PIL_FORMATS[fmt]
    if fmt == "jpeg" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=name, **opts)
    return buf.getvalue()


def video_frames(video: Any) -> list[Any]:
    """A video as RGB uint8 arrays, one per frame: from a ``(frames, H, W, 3)`` array (floats in
    [0, 1] or uint8), a torch tensor of that shape, or a list of PIL images."""
    import numpy as np

    if hasattr(video, "detach"):  # a torch tensor
        video = video.detach().float().cpu().numpy()
    if isinstance(video, (list, tuple)) and video and hasattr(video[0], "convert"):
        return [np.asarray(f.convert("RGB"), dtype=np.uint8) for f in video]
    arr = np.asarray(video)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (frames, height, width, 3), got {arr.shape}")
    return list(arr)


def encode_video(video: Any, fmt: str, fps: int) -> bytes:
    """``video`` as an MP4 (H.264 through PyAV's bundled FFmpeg), animated WebP or GIF at ``fps``."""
    frames = video_frames(video)
    buf = io.BytesIO()
    if fmt == "mp4":
        import av

        with av.open(buf, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width = frames[0].shape[:2]
            stream.pix_fmt = "yuv420p"
            # Visually lossless and fast to encode: the video is decoded once by one client.
            stream.options = {"crf": "18", "preset": "veryfast"}
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return buf.getvalue()
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    duration = max(1, round(1000 / fps))
    if fmt == "webp":
        images[0].save(buf, format="WEBP", save_all=True, append_images=images[1:], duration=duration,
                       loop=0, quality=90)
    elif fmt == "gif":
        images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    else:
        raise ValueError(f"{fmt!r} is not a video format")
    return buf.getvalue()


def encode_output(item: Any, fmt: str, fps: int | None = None) -> bytes:
    """One output of a job in its format: a still image, or (``fps`` set) a video."""
    return encode_video(item, fmt, fps) if fps is not None else encode_image(item, fmt)
