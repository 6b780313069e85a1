// A camserve client in Node.js, as a new user writes one: @grpc/grpc-js and @grpc/proto-loader,
// built from protos/camserve/v1/explain.proto alone (plus the standard grpc.health.v1 service).
//
// Usage: node client.mjs CONFIG.json
// CONFIG: {"address", "proto", "images": [{"path", "height", "width"}], "model"}
// Every check is an assertion here; on success it prints one JSON line summarising what it saw.

import assert from "node:assert/strict";
import { readFileSync, writeFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const HEALTH_PROTO = `
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health { rpc Check(HealthCheckRequest) returns (HealthCheckResponse); }
`;

const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true };
const MAX_MESSAGE = 64 * 1024 * 1024;

function load(path) {
  const definition = protoLoader.loadSync(path, LOADER_OPTIONS);
  return grpc.loadPackageDefinition(definition);
}

function healthProtoPath() {
  const path = join(mkdtempSync(join(tmpdir(), "camserve-health-")), "health.proto");
  writeFileSync(path, HEALTH_PROTO);
  return path;
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 120_000);
    client[method](request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// IEEE 754 half precision to a JS number (Float16Array is not in every Node release).
function halfToNumber(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * 2 ** -14 * (fraction / 1024);
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * 2 ** (exponent - 15) * (1 + fraction / 1024);
}

const ITEM_SIZES = { DTYPE_FLOAT32: 4, DTYPE_FLOAT16: 2, DTYPE_UINT8: 1 };

function decode(tensor) {
  const buffer = tensor.data;
  const count = buffer.length / ITEM_SIZES[tensor.dtype];
  const values = new Float64Array(count);
  for (let i = 0; i < count; i += 1) {
    if (tensor.dtype === "DTYPE_FLOAT16") values[i] = halfToNumber(buffer.readUInt16LE(2 * i));
    else if (tensor.dtype === "DTYPE_FLOAT32") values[i] = buffer.readFloatLE(4 * i);
    else values[i] = buffer[i] / 255;
  }
  return values;
}

function checkHeatmap(heatmap, image, where) {
  const tensor = heatmap.data;
  assert.ok(tensor, `${where}: heatmap without data`);
  assert.equal(tensor.dtype, "DTYPE_FLOAT16", `${where}: dtype`);
  assert.deepEqual(tensor.shape, [image.height, image.width], `${where}: shape`);
  assert.equal(tensor.data.length, image.height * image.width * 2, `${where}: byte length`);
  const values = decode(tensor);
  let low = Infinity;
  let high = -Infinity;
  for (const value of values) {
    assert.ok(Number.isFinite(value), `${where}: non-finite value ${value}`);
    if (value < low) low = value;
    if (value > high) high = value;
  }
  assert.ok(low >= 0 && high <= 1, `${where}: values in [${low}, ${high}], expected within [0, 1]`);
  assert.ok(high > low, `${where}: a constant map`);
  return { method: heatmap.method, class_index: heatmap.class_index, shape: tensor.shape, low, high };
}

function explainRequest(config) {
  return {
    model: config.model,
    images: config.images.map((image) => ({ encoded: readFileSync(image.path), target: { top_k: 2 } })),
    methods: ["METHOD_GRADCAM", "METHOD_LAYERCAM"],
    output: { dtype: "DTYPE_FLOAT16", resolution: "RESOLUTION_ORIGINAL" },
    request_id: "node-explain",
  };
}

function checkExplanation(response, config) {
  assert.equal(response.request_id, "node-explain");
  assert.equal(response.results.length, config.images.length);
  return response.results.map((result, index) => {
    const image = config.images[index];
    assert.equal(result.heatmaps.length, 4, `image ${index}: 2 methods x top 2 classes`);
    assert.ok(result.predictions.length >= 2, `image ${index}: predictions`);
    const topTwo = result.predictions.slice(0, 2).map((p) => p.index).sort();
    const explained = [...new Set(result.heatmaps.map((h) => h.class_index))].sort();
    assert.deepEqual(explained, topTwo, `image ${index}: top-k classes are the top predictions`);
    return {
      top: { index: result.predictions[0].index, label: result.predictions[0].label },
      heatmaps: result.heatmaps.map((h, k) => checkHeatmap(h, image, `image ${index} heatmap ${k}`)),
    };
  });
}

function stream(client, config) {
  const good = { ...explainRequest(config), images: [explainRequest(config).images[0]] };
  const requests = [
    { ...good, request_id: "node-good-1" },
    { images: [{ encoded: Buffer.from("not an image") }], request_id: "node-bad" },
    { ...good, request_id: "node-good-2" },
  ];
  return new Promise((resolve, reject) => {
    const answers = {};
    const duplex = client.ExplainStream({ deadline: new Date(Date.now() + 180_000) });
    duplex.on("data", (response) => {
      answers[response.request_id] = response;
    });
    duplex.on("error", reject);
    duplex.on("end", () => resolve(answers));
    for (const request of requests) duplex.write(request);
    duplex.end();
  });
}

async function main() {
  const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
  const options = {
    "grpc.max_receive_message_length": MAX_MESSAGE,
    "grpc.max_send_message_length": MAX_MESSAGE,
  };
  const credentials = grpc.credentials.createInsecure();
  const camserve = load(config.proto).camserve.v1;
  const health = load(healthProtoPath()).grpc.health.v1;
  const client = new camserve.ExplainService(config.address, credentials, options);
  const healthClient = new health.Health(config.address, credentials, options);

  const overall = await call(healthClient, "Check", { service: "" });
  const named = await call(healthClient, "Check", { service: "camserve.v1.ExplainService" });
  assert.equal(overall.status, "SERVING");
  assert.equal(named.status, "SERVING");

  const listed = await call(client, "ListModels", {});
  const names = listed.models.map((m) => m.name);
  assert.ok(names.includes(config.model), `ListModels: ${names}`);
  const info = await call(client, "GetModel", { name: config.model });
  assert.equal(info.name, config.model);
  assert.ok(info.ready);
  assert.ok(info.layers.length > 0 && info.layers.every((l) => l.output_shape.length === 3));
  assert.ok(info.methods.includes("METHOD_LAYERCAM"));
  const missing = await call(client, "GetModel", { name: "no-such-model" }).then(
    () => assert.fail("GetModel of an unknown model succeeded"),
    (error) => error,
  );
  assert.equal(missing.code, grpc.status.NOT_FOUND);

  const explained = checkExplanation(await call(client, "Explain", explainRequest(config)), config);

  const answers = await stream(client, config);
  assert.deepEqual(Object.keys(answers).sort(), ["node-bad", "node-good-1", "node-good-2"]);
  assert.equal(answers["node-bad"].error.code, grpc.status.INVALID_ARGUMENT);
  assert.ok(answers["node-bad"].error.message.length > 0);
  for (const id of ["node-good-1", "node-good-2"]) {
    assert.equal(answers[id].error, null, `${id}: ${answers[id].error && answers[id].error.message}`);
    assert.equal(answers[id].results.length, 1);
    answers[id].results[0].heatmaps.forEach((h, k) => checkHeatmap(h, config.images[0], `${id} ${k}`));
  }

  client.close();
  healthClient.close();
  const summary = {
    health: named.status,
    models: names,
    layers: info.layers.length,
    explained,
    stream_error: { code: answers["node-bad"].error.code, message: answers["node-bad"].error.message },
  };
  console.log(JSON.stringify(summary));
}

main().catch((error) => {
  console.error(error && error.stack ? error.stack : error);
  process.exit(1);
});
