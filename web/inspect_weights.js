// Shows Inspect Aggregation Weights' table (its UI text output) on the node, in a read-only text box that is
// neither saved with the workflow nor sent with the prompt.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE = "CIDM_InspectAggregationWeights";
const WIDGET = "weights_table";
const TABLE_HEIGHT = 360;

app.registerExtension({
  name: "cidm.InspectAggregationWeights",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.options.serialize = false;  // not an input: stays out of the prompt
        widget.serialize = false;          // and out of the saved workflow's widgets_values
        if (widget.element) {
          widget.element.readOnly = true;
          widget.element.style.fontFamily = "monospace";
        }
        // Room for the whole table (a header and one row per layer) besides the heatmap.
        this.setSize([Math.max(this.size[0], 480), this.size[1] + TABLE_HEIGHT]);
      }
      widget.value = (message?.text ?? []).join("\n");
      this.setDirtyCanvas(true, true);
    };
  },
});
