// Lets ComfyUI load the workflow embedded in a JPEG saved by Klein Watermark & Save (stock ComfyUI reads PNG/WebP only).
import { app } from "../../scripts/app.js";
import { readJpegMetadata } from "./klein_exif.js";

app.registerExtension({
  name: "klein.jpegWorkflow",
  setup() {
    const original = app.handleFile.bind(app);
    app.handleFile = async function (file, ...rest) {
      if (file?.type === "image/jpeg") {
        const found = readJpegMetadata(await file.arrayBuffer());
        if (found.workflow) return app.loadGraphData(JSON.parse(found.workflow));
        if (found.prompt) return app.loadApiJson(JSON.parse(found.prompt), file.name);
      }
      return original(file, ...rest);
    };
  },
});
