"""Job outputs: images to bucket URLs when upload is configured, and RunPod's size limit otherwise.

RunPod drops a job result over about 20 MB (the SDK logs a 400 and the caller never learns why),
so a result that large fails here with its size and the fix instead.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import shutil
import uuid
from pathlib import Path
from typing import Any

MB = 1_000_000
UPLOAD_FIX = ("set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY on the endpoint "
              "so images come back as URLs, or ask for fewer or smaller images")


def too_big(size: int, limit: int, *, upload: bool) -> str | None:
    """The error for a result of ``size`` bytes, or None when it fits."""
    if size <= limit:
        return None
    fix = "ask for fewer or smaller images (images are already uploaded)" if upload else UPLOAD_FIX
    return f"the result is {size / MB:.1f} MB, over RunPod's {limit / MB:.0f} MB limit for a job's output; {fix}"


def _extension(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".png"


def _upload_one(job_id: str, text: str, folder: Path, bucket: str | None) -> str:
    from runpod.serverless.utils import rp_upload  # the SDK: only when uploading

    try:
        data = base64.b64decode(text.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        return text  # not an image (Forge puts some text in image lists): leave it as it came
    path = folder / f"{uuid.uuid4().hex}{_extension(data)}"
    path.write_bytes(data)
    try:
        return str(rp_upload.upload_image(job_id, str(path), bucket_name=bucket))
    finally:
        path.unlink(missing_ok=True)


def _upload_all(result: dict[str, Any], job_id: str, scratch: Path, bucket: str | None) -> dict[str, Any]:
    folder = scratch / f"upload-{uuid.uuid4().hex}"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        images = result.get("images")
        if isinstance(images, list):
            result["images"] = [_upload_one(job_id, i, folder, bucket) if isinstance(i, str) else i for i in images]
        image = result.get("image")
        if isinstance(image, str) and image:
            result["image"] = _upload_one(job_id, image, folder, bucket)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result


async def upload_images(result: dict[str, Any], job_id: str, scratch: Path, bucket: str | None) -> dict[str, Any]:
    """Replace base64 images (``images`` list, ``image``) by bucket URLs; boto3 blocks, so in a thread."""
    return await asyncio.to_thread(_upload_all, result, job_id, scratch, bucket)


def jsonio_size(result: Any) -> bytes:
    """The serialised result, to measure what RunPod will send once images are URLs (small by then)."""
    from worker import jsonio

    return jsonio.dumps(result)
