// Shows, under a Klein node, the report lines it returned (ui.text): what it rounded, cropped, cut or dropped,
// and for Klein Watermark & Save the watermark bits read back and the C2PA state of each file.
import { app } from "../../scripts/app.js";

const NAME = "klein_report";

function showReport(node, lines) {
  let widget = node.widgets?.find((w) => w.name === NAME);
  if (!widget) {
    const area = document.createElement("textarea");
    area.readOnly = true;
    area.style.cssText = "width:100%;font-size:11px;opacity:0.85;resize:none;white-space:pre-wrap;";
    widget = node.addDOMWidget(NAME, "klein_report", area, {
      serialize: false,
      getValue: () => area.value,
      setValue: (value) => (area.value = value),
    });
    widget.serialize = false; // never part of the saved widget values
  }
  widget.element.value = lines.join("\n");
  widget.element.rows = Math.min(8, Math.max(2, lines.length + 1));
  node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "klein.nodeReport",
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
