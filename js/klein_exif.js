// Reads ComfyUI's workflow/prompt EXIF convention (IFD0 ASCII tags "workflow:<json>", "prompt:<json>") from JPEG bytes.
// Pure: no ComfyUI imports, so it can be tested on its own.

export function readJpegMetadata(buffer) {
  const bytes = new Uint8Array(buffer);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (view.getUint16(0) !== 0xffd8) return {};
  let offset = 2;
  while (offset + 4 <= bytes.length && bytes[offset] === 0xff) {
    const marker = bytes[offset + 1];
    const length = view.getUint16(offset + 2);
    if (marker === 0xda) break; // start of scan: no more metadata segments
    const exifHeader = String.fromCharCode(...bytes.subarray(offset + 4, offset + 10));
    if (marker === 0xe1 && exifHeader === "Exif\0\0") return readTiff(bytes, offset + 10);
    offset += 2 + length;
  }
  return {};
}

function readTiff(bytes, start) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const little = bytes[start] === 0x49; // "II"
  const u16 = (at) => view.getUint16(start + at, little);
  const u32 = (at) => view.getUint32(start + at, little);
  const found = {};
  const ifd = u32(4);
  for (let i = 0; i < u16(ifd); i++) {
    const entry = ifd + 2 + 12 * i;
    if (u16(entry + 2) !== 2) continue; // ASCII only
    const count = u32(entry + 4);
    const at = count <= 4 ? entry + 8 : u32(entry + 8);
    const text = new TextDecoder().decode(bytes.subarray(start + at, start + at + count)).replace(/\0+$/, "");
    const colon = text.indexOf(":");
    if (colon > 0) found[text.slice(0, colon).toLowerCase()] ??= text.slice(colon + 1);
  }
  return found;
}
