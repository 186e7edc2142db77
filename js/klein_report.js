// Shows, under a Klein node, the report lines it returned (ui.text): what it rounded, cropped, cut or dropped,
// and for Klein Watermark & Save the watermark bits read back and the C2PA state of each file. The box is as tall
// as the wrapped text (up to MAX_HEIGHT, then it scrolls), measured again when the node's width changes.
// And when a Klein node fails in a frontend whose own toast shows only "<node> failed" and a fixed sentence (1.46
// and later; the message is behind "View details"), a toast whose first line is the pack's message.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NAME = "klein_report";
const MARGIN = 6; // around the textarea, inside the widget's height
const MIN_HEIGHT = 36;
const MAX_HEIGHT = 480;

function showReport(node, lines) {
  let widget = node.widgets?.find((w) => w.name === NAME);
  if (!widget) {
    const area = document.createElement("textarea");
    area.readOnly = true;
    area.style.cssText = "width:100%;height:100%;font-size:11px;opacity:0.85;resize:none;white-space:pre-wrap;overflow-y:auto;";
    widget = node.addDOMWidget(NAME, "klein_report", area, {
      serialize: false,
      margin: MARGIN,
      getValue: () => area.value,
      setValue: (value) => (area.value = value),
      getMinHeight: () => widget?.kleinHeight ?? MIN_HEIGHT,
      getMaxHeight: () => widget?.kleinHeight ?? MIN_HEIGHT,
    });
    widget.serialize = false; // never part of the saved widget values
    const onResize = node.onResize;
    node.onResize = function () {
      onResize?.apply(this, arguments);
      if (Math.abs(this.size[0] - (widget.kleinWidth ?? 0)) > 4) requestAnimationFrame(() => fitReport(this, widget));
    };
  }
  widget.element.value = lines.join("\n");
  widget.kleinHeight = 14 * lines.length + 6 + 2 * MARGIN; // a first guess (one line each) until the text is laid out
  fitReport(node, widget);
  requestAnimationFrame(() => fitReport(node, widget, 10));
}

// The textarea's wrapped height at its current width (scrollHeight with the height collapsed), and the node grown
// to show it; retried on the next frames while the element is not laid out yet.
function fitReport(node, widget, retries = 0) {
  const area = widget.element;
  if (area.isConnected && area.clientWidth > 40) {
    const height = area.style.height;
    area.style.height = "0px";
    widget.kleinHeight = Math.min(MAX_HEIGHT, Math.max(MIN_HEIGHT, area.scrollHeight + 2 + 2 * MARGIN));
    area.style.height = height; // back to 100%: the box the frontend gives the widget
    widget.kleinWidth = node.size[0];
  } else if (retries > 0) {
    requestAnimationFrame(() => fitReport(node, widget, retries - 1));
  }
  const needed = node.computeSize()[1];
  if (needed > node.size[1]) node.setSize([node.size[0], needed]);
  node.setDirtyCanvas?.(true, true);
}

// Frontends from 1.46 show a failed node as "<node> failed" plus a fixed sentence (the error catalog's toastMessage,
// resolveSingleOverlayCopy); 1.45 and older show "<type>: <message>" themselves, as does the error dialog that
// replaces the errors panel when Comfy.RightSidePanel.ShowErrorsTab is off.
function frontendHidesMessage() {
  const [major, minor] = String(window.__COMFYUI_FRONTEND_VERSION__ ?? "0.0").split(".").map(Number);
  const panel = app.extensionManager?.setting?.get?.("Comfy.RightSidePanel.ShowErrorsTab") !== false;
  return panel && (major > 1 || (major === 1 && minor >= 46));
}

app.registerExtension({
  name: "klein.nodeReport",
  setup() {
    api.addEventListener("execution_error", ({ detail }) => {
      // The pack's errors reach the frontend as "KleinError", "CheckpointError", ... (errors.py); dotted names are
      // other libraries' errors (torch's out-of-memory, ...), which the frontend explains itself.
      const type = detail?.exception_type ?? "";
      if (!String(detail?.node_type ?? "").startsWith("Klein") || !type || type.includes(".")) return;
      if (!frontendHidesMessage()) return;
      app.extensionManager?.toast?.add({
        severity: "error",
        summary: String(detail.exception_message ?? "").trim() || type,
        detail: `${type} in ${app.graph?.getNodeById?.(Number(detail.node_id))?.title ?? detail.node_type}`,
        life: 15000,
      });
    });
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("Klein")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const lines = output?.text;
      if (Array.isArray(lines) && lines.length) showReport(this, lines.map(String));
    };
  },
});
