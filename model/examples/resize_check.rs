fn main() {
    let img = q3vl_model::image::load_rgb(std::path::Path::new("fixtures/tied/traces/image.png")).unwrap();
    for (w, h) in [(160, 96), (160, 100), (150, 96)] {
        let r = q3vl_model::image::resize_bicubic(&img, w, h);
        std::fs::write(format!("/tmp/rust_{w}x{h}.bin"), &r.data).unwrap();
    }
}
