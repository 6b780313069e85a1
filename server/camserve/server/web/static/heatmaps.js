// Heatmaps as the API sends them (camserve.v1 Tensor in protobuf's JSON mapping: dtype name,
// shape as strings, little-endian bytes in base64) turned into pixels, PNGs and .npy files.

const DTYPES = {
  DTYPE_UNSPECIFIED: { bytes: 4, npy: "<f4" },
  DTYPE_FLOAT32: { bytes: 4, npy: "<f4" },
  DTYPE_FLOAT16: { bytes: 2, npy: "<f2" },
  DTYPE_UINT8: { bytes: 1, npy: "|u1" },
};

function base64Bytes(text) {
  const binary = atob(text || "");
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exponent = (h >> 10) & 0x1f;
  const fraction = h & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

// A tensor as {height, width, values (Float32Array), bytes (the raw payload), dtype}.
export function decodeTensor(tensor) {
  const dtype = tensor.dtype || "DTYPE_UNSPECIFIED";
  const kind = DTYPES[dtype];
  if (!kind) throw new Error(`heatmap dtype ${dtype} cannot be shown here`);
  const [height, width] = (tensor.shape || []).map(Number);
  const bytes = base64Bytes(tensor.data);
  if (bytes.length !== height * width * kind.bytes) {
    throw new Error(`heatmap of ${height}x${width} came with ${bytes.length} bytes`);
  }
  const view = new DataView(bytes.buffer);
  const values = new Float32Array(height * width);
  for (let i = 0; i < values.length; i++) {
    if (kind.bytes === 4) values[i] = view.getFloat32(4 * i, true);
    else if (kind.bytes === 2) values[i] = halfToFloat(view.getUint16(2 * i, true));
    else values[i] = bytes[i] / 255;
  }
  return { height, width, values, bytes, dtype };
}

// Jet, as the server's overlays draw it: each channel a trapezoid over [0, 1].
function jet(x) {
  const channel = (c) => Math.round(255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * x - c))));
  return [channel(3), channel(2), channel(1)];
}
const LUT = Array.from({ length: 256 }, (_, i) => jet(i / 255));

// The heatmap coloured with jet, min-max normalised first (raw maps are unnormalised).
export function colouredCanvas(map) {
  let low = Infinity;
  let high = -Infinity;
  for (const v of map.values) {
    if (v < low) low = v;
    if (v > high) high = v;
  }
  const span = high > low ? high - low : 1;
  const canvas = document.createElement("canvas");
  canvas.width = map.width;
  canvas.height = map.height;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(map.width, map.height);
  for (let i = 0; i < map.values.length; i++) {
    const [r, g, b] = LUT[Math.round((255 * (map.values[i] - low)) / span)];
    pixels.data.set([r, g, b, 255], 4 * i);
  }
  context.putImageData(pixels, 0, 0);
  return canvas;
}

// Draws the photo with the coloured map over it at `opacity`, or the map alone when `raw`.
export function drawOverlay(target, photo, coloured, opacity, raw) {
  target.width = photo.naturalWidth;
  target.height = photo.naturalHeight;
  const context = target.getContext("2d");
  context.imageSmoothingEnabled = coloured.width >= target.width / 4;
  context.globalAlpha = 1;
  if (raw) {
    context.drawImage(coloured, 0, 0, target.width, target.height);
    return;
  }
  context.drawImage(photo, 0, 0);
  context.globalAlpha = opacity;
  context.drawImage(coloured, 0, 0, target.width, target.height);
  context.globalAlpha = 1;
}

// The map as a NumPy .npy file (format 1.0) of its dtype, ready to np.load.
export function npyBlob(map) {
  return npyOf(map.dtype, [map.height, map.width], map.bytes);
}

// Any tensor of the API (a conv layer's weights, say) as a .npy file, whatever its rank.
export function tensorNpyBlob(tensor) {
  const shape = (tensor.shape || []).map(Number);
  return npyOf(tensor.dtype || "DTYPE_UNSPECIFIED", shape, base64Bytes(tensor.data));
}

function npyOf(dtype, shape, bytes) {
  const descr = DTYPES[dtype].npy;
  const dims = shape.length === 1 ? `${shape[0]},` : shape.join(", ");
  let header = `{'descr': '${descr}', 'fortran_order': False, 'shape': (${dims}), }`;
  const unpadded = 10 + header.length + 1;
  header += " ".repeat((64 - (unpadded % 64)) % 64) + "\n";
  const preamble = new Uint8Array(10);
  preamble.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]); // \x93NUMPY v1.0
  preamble[8] = header.length & 0xff;
  preamble[9] = header.length >> 8;
  return new Blob([preamble, new TextEncoder().encode(header), bytes], {
    type: "application/octet-stream",
  });
}

export function download(blob, filename) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}
