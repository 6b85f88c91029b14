//! PNG and SVG plots for compression reports: singular spectra, Block Influence, block similarity
//! and the size against quality trade-off of the candidates a planner tried.
//!
//! Every function draws one figure twice, into `<stem>.png` and `<stem>.svg` inside a directory
//! that it creates if needed, and returns both paths in that order.
//!
//! Text in the PNG is rasterised by `ab_glyph` from a TrueType font registered at run time: the
//! file named by the `EDGEFOLD_PLOT_FONT` environment variable, else the first font found among
//! common system paths (DejaVu Sans from Debian's `fonts-dejavu-core` comes first). Without a font,
//! a warning is logged once and the PNG is drawn without any text, while the SVG keeps its text
//! because the viewer renders it.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::drawing::DrawingAreaErrorKind;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};
use plotters_backend::{self as backend, BackendColor, BackendCoord, DrawingErrorKind};

/// Environment variable that names a TrueType font file to use before the system paths.
pub const FONT_ENV: &str = "EDGEFOLD_PLOT_FONT";

/// TrueType fonts tried in order when [`FONT_ENV`] is unset or unreadable.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Family name under which the font is registered and that every text style uses.
/// SVG files name the same family, so viewers substitute their own sans-serif font.
const FONT_FAMILY: &str = "sans-serif";

const WIDE_SIZE: (u32, u32) = (1000, 620);
const HEAT_MAP_SIZE: (u32, u32) = (860, 760);

/// Largest matrix whose values are printed inside the heat map cells.
const MAX_ANNOTATED_BLOCKS: usize = 12;
/// Largest number of spectra named one by one in the legend.
const MAX_LEGEND_SPECTRA: usize = 12;
/// Largest number of candidates labelled next to their points.
const MAX_LABELLED_CANDIDATES: usize = 30;

/// Line colours, from the Tableau 10 palette.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Samples of matplotlib's viridis map at 0, 1/4, 1/2, 3/4 and 1, for values in [0, 1].
const VIRIDIS: [RGBColor; 5] = [
    RGBColor(68, 1, 84),
    RGBColor(59, 82, 139),
    RGBColor(33, 145, 140),
    RGBColor(94, 201, 98),
    RGBColor(253, 231, 37),
];

/// Every second colour of ColorBrewer's 11-class RdBu diverging map without its darkest ends:
/// blue at -1, near white at 0 and red at 1.
const RED_BLUE: [RGBColor; 5] = [
    RGBColor(33, 102, 172),
    RGBColor(146, 197, 222),
    RGBColor(247, 247, 247),
    RGBColor(244, 165, 130),
    RGBColor(178, 24, 43),
];

/// Error from the plotting functions.
#[derive(Debug)]
#[non_exhaustive]
pub enum PlotError {
    /// The file stem is empty, `.` or `..`, or contains a path separator.
    InvalidStem {
        /// The rejected stem.
        stem: String,
    },
    /// The input contains nothing that can be drawn.
    NoData {
        /// Description of the missing data, for example "no Block Influence values".
        reason: &'static str,
    },
    /// Block Influence and angular distance have different lengths.
    LengthMismatch {
        /// Number of Block Influence values.
        influence: usize,
        /// Number of angular distances.
        angular: usize,
    },
    /// A row of the similarity matrix does not have as many values as the matrix has rows.
    NotSquare {
        /// Index of the first row of the wrong length.
        row: usize,
        /// Length of that row.
        len: usize,
        /// Number of rows, which every row length must equal.
        expected: usize,
    },
    /// The output directory could not be created.
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The error from the file system.
        source: io::Error,
    },
    /// plotters failed to draw or write a file.
    Draw {
        /// The file being written.
        path: PathBuf,
        /// plotters' error message.
        message: String,
    },
}

impl fmt::Display for PlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidStem { stem } => write!(
                f,
                "invalid plot file stem {stem:?}: use a non-empty file name without path \
                 separators and without an extension"
            ),
            Self::NoData { reason } => write!(f, "nothing to plot: {reason}"),
            Self::LengthMismatch { influence, angular } => write!(
                f,
                "{influence} Block Influence values but {angular} angular distances: pass one of \
                 each per block, or no angular distances"
            ),
            Self::NotSquare { row, len, expected } => write!(
                f,
                "similarity matrix is not square: row {row} has {len} values but the matrix has \
                 {expected} rows"
            ),
            Self::CreateDir { path, source } => {
                write!(f, "failed to create plot directory {}: {source}", path.display())
            }
            Self::Draw { path, message } => {
                write!(f, "failed to draw {}: {message}", path.display())
            }
        }
    }
}

impl std::error::Error for PlotError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::CreateDir { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Singular spectrum of one matrix and the ranks to mark on it.
#[derive(Debug, Clone, Copy)]
pub struct SpectrumPlot<'a> {
    /// Matrix name shown in the legend.
    pub name: &'a str,
    /// Singular values of the raw matrix, in descending order.
    pub singular_values: &'a [f64],
    /// Singular values of the matrix whitened by calibration statistics, in descending order.
    pub whitened: Option<&'a [f64]>,
    /// Rank at the elbow of the raw spectrum.
    pub elbow: usize,
    /// Smallest rank that keeps 90 % of the squared Frobenius norm.
    pub energy_90: usize,
    /// Smallest rank that keeps 99 % of the squared Frobenius norm.
    pub energy_99: usize,
    /// Largest rank whose factors are smaller than the dense matrix.
    pub break_even: usize,
}

/// One compressed model that a planner evaluated.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Short description shown next to the point, for example "int8, drop 3".
    pub label: &'a str,
    /// Size of the packed model in bytes.
    pub bytes: u64,
    /// Retained quality, for example the mean cosine similarity to the original outputs.
    pub quality: f64,
    /// Whether the planner chose this candidate.
    pub chosen: bool,
}

/// Plots the normalised singular values s_i / s_0 of several matrices on a log scale, one colour
/// per matrix, with the raw spectrum solid and the whitened one dashed.
///
/// The elbow, 90 % and 99 % energy and break-even ranks are marked on the raw curve: rank `k` is
/// drawn on the k-th singular value, the last one kept. Each spectrum is divided by its own largest
/// value, which is s_0 for a descending spectrum. Zero, negative and non-finite values cannot be
/// shown on a log axis and leave gaps in the curve, as do ratios below 1e-18, which are rounding
/// noise. Ranks of 0 or past the end are not marked.
///
/// # Errors
///
/// [`PlotError::NoData`] when no spectrum has a positive finite value, [`PlotError::InvalidStem`],
/// [`PlotError::CreateDir`] and [`PlotError::Draw`].
pub fn plot_spectra(
    dir: &Path,
    stem: &str,
    title: &str,
    spectra: &[SpectrumPlot],
) -> Result<[PathBuf; 2], PlotError> {
    let figure = SpectraFigure::new(title, spectra)?;
    write_figure(dir, stem, WIDE_SIZE, &figure)
}

/// Draws a bar chart of each block's Block Influence, 1 - cos(h_in, h_out), with its angular
/// distance arccos(cos(h_in, h_out)) / π as a second bar beside it.
///
/// `angular` may be empty, and then only Block Influence is drawn. Non-finite values draw no bar.
///
/// # Errors
///
/// [`PlotError::NoData`] when `influence` is empty, [`PlotError::LengthMismatch`] when `angular` is
/// neither empty nor as long as `influence`, [`PlotError::InvalidStem`], [`PlotError::CreateDir`]
/// and [`PlotError::Draw`].
pub fn plot_block_influence(
    dir: &Path,
    stem: &str,
    title: &str,
    influence: &[f64],
    angular: &[f64],
) -> Result<[PathBuf; 2], PlotError> {
    if influence.is_empty() {
        return Err(PlotError::NoData { reason: "no Block Influence values" });
    }
    if !angular.is_empty() && angular.len() != influence.len() {
        return Err(PlotError::LengthMismatch {
            influence: influence.len(),
            angular: angular.len(),
        });
    }
    let figure = InfluenceFigure { title, influence, angular };
    write_figure(dir, stem, WIDE_SIZE, &figure)
}

/// Draws a heat map of a square block-by-block similarity matrix with a colour bar, row 0 at the
/// top.
///
/// The colour scale is [0, 1], or [-1, 1] with a diverging map when any value is negative. Values
/// outside the scale get its end colour, and non-finite values are grey. Matrices of at most 12
/// blocks have their values printed in the cells.
///
/// # Errors
///
/// [`PlotError::NoData`] when the matrix is empty, [`PlotError::NotSquare`],
/// [`PlotError::InvalidStem`], [`PlotError::CreateDir`] and [`PlotError::Draw`].
pub fn plot_similarity(
    dir: &Path,
    stem: &str,
    title: &str,
    matrix: &[Vec<f64>],
) -> Result<[PathBuf; 2], PlotError> {
    if matrix.is_empty() {
        return Err(PlotError::NoData { reason: "the similarity matrix is empty" });
    }
    if let Some((row, values)) = matrix.iter().enumerate().find(|(_, r)| r.len() != matrix.len()) {
        return Err(PlotError::NotSquare { row, len: values.len(), expected: matrix.len() });
    }
    let figure = SimilarityFigure::new(title, matrix);
    write_figure(dir, stem, HEAT_MAP_SIZE, &figure)
}

/// Plots the size in MB (10^6 bytes) against the retained quality of the candidates a planner
/// tried, highlights the chosen one, joins the Pareto-optimal candidates and draws the quality
/// floor as a horizontal line when `floor` is given.
///
/// Candidates with a non-finite quality are left out.
///
/// # Errors
///
/// [`PlotError::NoData`] when `candidates` is empty, [`PlotError::InvalidStem`],
/// [`PlotError::CreateDir`] and [`PlotError::Draw`].
pub fn plot_size_quality(
    dir: &Path,
    stem: &str,
    title: &str,
    candidates: &[Candidate],
    floor: Option<f64>,
) -> Result<[PathBuf; 2], PlotError> {
    if candidates.is_empty() {
        return Err(PlotError::NoData { reason: "no candidates" });
    }
    let figure = SizeQualityFigure { title, candidates, floor: floor.filter(|f| f.is_finite()) };
    write_figure(dir, stem, WIDE_SIZE, &figure)
}

/// Error of one drawing step, with plotters' backend error type erased so that one figure's code
/// serves both backends.
struct DrawFailure(String);

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for DrawFailure {
    fn from(error: DrawingAreaErrorKind<E>) -> Self {
        Self(error.to_string())
    }
}

/// A figure that can be drawn on any plotters backend.
trait Figure {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawFailure>;
}

/// Draws `figure` into `<dir>/<stem>.png` and `<dir>/<stem>.svg`.
fn write_figure(
    dir: &Path,
    stem: &str,
    size: (u32, u32),
    figure: &impl Figure,
) -> Result<[PathBuf; 2], PlotError> {
    write_figure_with_font(dir, stem, size, figure, font_registered())
}

/// Draws `figure` into both files, rasterising PNG text only when `font` is true.
fn write_figure_with_font(
    dir: &Path,
    stem: &str,
    size: (u32, u32),
    figure: &impl Figure,
    font: bool,
) -> Result<[PathBuf; 2], PlotError> {
    let is_file_name = !stem.is_empty()
        && stem != "."
        && stem != ".."
        && !stem.contains(['/', '\\'])
        && Path::new(stem).file_name().is_some();
    if !is_file_name {
        return Err(PlotError::InvalidStem { stem: stem.to_owned() });
    }
    fs::create_dir_all(dir)
        .map_err(|source| PlotError::CreateDir { path: dir.to_owned(), source })?;

    let png = dir.join(format!("{stem}.png"));
    let bitmap = TextGate { inner: BitMapBackend::new(&png, size), font, text_without_font: false };
    render(bitmap, figure)
        .map_err(|DrawFailure(message)| PlotError::Draw { path: png.clone(), message })?;

    let svg = dir.join(format!("{stem}.svg"));
    let vector = TextGate { inner: SVGBackend::new(&svg, size), font, text_without_font: true };
    render(vector, figure)
        .map_err(|DrawFailure(message)| PlotError::Draw { path: svg.clone(), message })?;

    Ok([png, svg])
}

fn render<DB: DrawingBackend>(backend: DB, figure: &impl Figure) -> Result<(), DrawFailure> {
    let root = backend.into_drawing_area();
    root.fill(&WHITE)?;
    figure.draw(&root)?;
    root.present()?;
    Ok(())
}

/// Registers a TrueType font for `ab_glyph` once per process and returns whether one was found.
fn font_registered() -> bool {
    static FONT: OnceLock<Option<PathBuf>> = OnceLock::new();
    FONT.get_or_init(register_first_font).is_some()
}

fn register_first_font() -> Option<PathBuf> {
    let from_env = std::env::var_os(FONT_ENV).map(PathBuf::from);
    let candidates = from_env.iter().cloned().chain(FONT_PATHS.iter().map(PathBuf::from));
    for path in candidates {
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if from_env.as_ref() == Some(&path) => {
                log::warn!(
                    "failed to read the font {} named by {FONT_ENV}: {error}",
                    path.display()
                );
                continue;
            }
            Err(_) => continue,
        };
        // `register_font` keeps a `'static` reference, so the file is leaked, once per process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
            log::debug!("plots use the font {}", path.display());
            return Some(path);
        }
        log::warn!("{} is not a valid TrueType font, trying the next one", path.display());
    }
    log::warn!(
        "no TrueType font found: PNG plots are drawn without text. Install DejaVu Sans \
         (fonts-dejavu-core on Debian) or set {FONT_ENV} to a .ttf file"
    );
    None
}

/// A backend wrapper that lets a figure be drawn when no font is registered.
///
/// plotters measures text through the font to lay out captions and labels, and the bitmap backend
/// rasterises glyphs from it. Without a font, this wrapper estimates text sizes from the character
/// count, and either skips text or, for SVG where the viewer renders it, passes it on.
struct TextGate<B> {
    inner: B,
    font: bool,
    text_without_font: bool,
}

impl<B: DrawingBackend> DrawingBackend for TextGate<B> {
    type ErrorType = B::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.ensure_prepared()
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.present()
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_pixel(point, color)
    }

    fn draw_line<S: backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_line(from, to, style)
    }

    fn draw_rect<S: backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }

    fn draw_path<S: backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_path(path, style)
    }

    fn draw_circle<S: backend::BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.draw_circle(center, radius, style, fill)
    }

    fn fill_polygon<S: backend::BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.fill_polygon(vert, style)
    }

    fn draw_text<TStyle: backend::BackendTextStyle>(
        &mut self,
        text: &str,
        style: &TStyle,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        if self.font || self.text_without_font {
            self.inner.draw_text(text, style, pos)
        } else {
            Ok(())
        }
    }

    fn estimate_text_size<TStyle: backend::BackendTextStyle>(
        &self,
        text: &str,
        style: &TStyle,
    ) -> Result<(u32, u32), DrawingErrorKind<Self::ErrorType>> {
        if self.font {
            return self.inner.estimate_text_size(text, style);
        }
        // An estimate: sans-serif glyphs advance about 0.55 em on average.
        let size = style.size().max(0.0);
        let width = 0.55 * size * text.chars().count() as f64;
        Ok((width.ceil() as u32, size.ceil() as u32))
    }

    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        self.inner.blit_bitmap(pos, size, src)
    }
}

fn text_style(size: f64) -> TextStyle<'static> {
    (FONT_FAMILY, size).into_font().color(&BLACK)
}

fn palette(index: usize) -> RGBColor {
    PALETTE[index % PALETTE.len()]
}

/// Shape of a point marker.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Marker {
    Circle,
    Triangle,
    Square,
    Diamond,
    Cross,
}

/// Draws a marker of about 12 pixels centred on `at`, in the pixel coordinates of `area`.
fn draw_marker<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    at: (i32, i32),
    marker: Marker,
    color: RGBColor,
) -> Result<(), DrawFailure> {
    let (x, y) = at;
    let fill = color.filled();
    let outline = BLACK.stroke_width(1);
    match marker {
        Marker::Circle => {
            area.draw(&Circle::new(at, 6, fill))?;
            area.draw(&Circle::new(at, 6, outline))?;
        }
        Marker::Triangle => {
            let corners = vec![(x, y - 7), (x - 7, y + 5), (x + 7, y + 5)];
            area.draw(&Polygon::new(corners.clone(), fill))?;
            area.draw(&PathElement::new([corners, vec![(x, y - 7)]].concat(), outline))?;
        }
        Marker::Square => {
            area.draw(&Rectangle::new([(x - 5, y - 5), (x + 5, y + 5)], fill))?;
            area.draw(&Rectangle::new([(x - 5, y - 5), (x + 5, y + 5)], outline))?;
        }
        Marker::Diamond => {
            let corners = vec![(x, y - 7), (x + 7, y), (x, y + 7), (x - 7, y)];
            area.draw(&Polygon::new(corners.clone(), fill))?;
            area.draw(&PathElement::new([corners, vec![(x, y - 7)]].concat(), outline))?;
        }
        Marker::Cross => {
            let stroke = color.stroke_width(3);
            area.draw(&PathElement::new(vec![(x - 6, y - 6), (x + 6, y + 6)], stroke))?;
            area.draw(&PathElement::new(vec![(x - 6, y + 6), (x + 6, y - 6)], stroke))?;
        }
    }
    Ok(())
}

/// Sample drawn before a legend label.
enum Swatch {
    Line(RGBColor),
    Dashed(RGBColor),
    Marker(Marker, RGBColor),
    Bar(RGBColor),
}

struct LegendEntry {
    label: String,
    swatch: Swatch,
}

impl LegendEntry {
    fn new(label: impl Into<String>, swatch: Swatch) -> Self {
        Self { label: label.into(), swatch }
    }
}

/// Corner of the plotting area where the legend is drawn.
#[derive(Clone, Copy)]
enum Corner {
    TopRight,
    BottomRight,
}

/// Draws a boxed legend inside `area`, which is a chart's plotting area in its own pixel
/// coordinates.
///
/// plotters' own series labels measure text through the font directly rather than through the
/// backend, so they would fail when no font is registered.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
    corner: Corner,
) -> Result<(), DrawFailure> {
    if entries.is_empty() {
        return Ok(());
    }
    const ROW: i32 = 22;
    const SWATCH: i32 = 30;
    const PAD: i32 = 8;

    let style = text_style(14.0);
    let mut text_width = 0;
    for entry in entries {
        let (width, _) = area.estimate_text_size(&entry.label, &style)?;
        text_width = text_width.max(width as i32);
    }
    let (area_width, area_height) = area.dim_in_pixel();
    let box_width = PAD + SWATCH + PAD + text_width + PAD;
    let box_height = PAD + ROW * entries.len() as i32 + PAD / 2;
    let left = area_width as i32 - box_width - 10;
    let top = match corner {
        Corner::TopRight => 10,
        Corner::BottomRight => area_height as i32 - box_height - 10,
    };

    let corners = [(left, top), (left + box_width, top + box_height)];
    area.draw(&Rectangle::new(corners, WHITE.mix(0.9).filled()))?;
    area.draw(&Rectangle::new(corners, BLACK.mix(0.4).stroke_width(1)))?;

    let label_style = style.pos(Pos::new(HPos::Left, VPos::Center));
    for (row, entry) in entries.iter().enumerate() {
        let y = top + PAD + ROW * row as i32 + ROW / 2;
        let x0 = left + PAD;
        let x1 = x0 + SWATCH;
        match entry.swatch {
            Swatch::Line(color) => {
                area.draw(&PathElement::new(vec![(x0, y), (x1, y)], color.stroke_width(2)))?;
            }
            Swatch::Dashed(color) => {
                for start in (x0..x1).step_by(10) {
                    let end = (start + 6).min(x1);
                    let dash = vec![(start, y), (end, y)];
                    area.draw(&PathElement::new(dash, color.stroke_width(2)))?;
                }
            }
            Swatch::Marker(marker, color) => draw_marker(area, ((x0 + x1) / 2, y), marker, color)?,
            Swatch::Bar(color) => {
                let bar = [(x0 + 4, y - 7), (x1 - 4, y + 7)];
                area.draw(&Rectangle::new(bar, color.filled()))?;
            }
        }
        area.draw(&Text::new(entry.label.clone(), (x1 + PAD, y), label_style.clone()))?;
    }
    Ok(())
}

/// Smallest ratio s_i / s_0 drawn. An f64 SVD resolves singular values only down to about
/// 2.2e-16 s_0, so smaller ones are rounding noise. Also, plotters 0.3.7 never finished laying out
/// a log axis that reached 1e-310 in a test.
const MIN_RATIO: f64 = 1e-18;

/// Divides a spectrum by its largest finite value and returns `None` where the ratio cannot be
/// drawn on a log axis: zero, negative, non-finite or below [`MIN_RATIO`], or in a spectrum
/// without a positive finite value.
fn normalise_spectrum(values: &[f64]) -> Vec<Option<f64>> {
    let max = values.iter().copied().filter(|v| v.is_finite()).fold(0.0, f64::max);
    values
        .iter()
        .map(|&v| {
            let ratio = v / max;
            (max > 0.0 && ratio.is_finite() && ratio >= MIN_RATIO).then_some(ratio)
        })
        .collect()
}

/// Splits a normalised spectrum at its gaps into runs of `(index + 1, ratio)` points.
fn contiguous_runs(ratios: &[Option<f64>]) -> Vec<Vec<(f64, f64)>> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    for (index, ratio) in ratios.iter().enumerate() {
        match ratio {
            Some(ratio) => current.push(((index + 1) as f64, *ratio)),
            None if !current.is_empty() => runs.push(std::mem::take(&mut current)),
            None => {}
        }
    }
    if !current.is_empty() {
        runs.push(current);
    }
    runs
}

/// A spectrum ready to draw.
struct NormalisedSpectrum<'a> {
    source: &'a SpectrumPlot<'a>,
    raw: Vec<Option<f64>>,
    whitened: Option<Vec<Option<f64>>>,
}

struct SpectraFigure<'a> {
    title: &'a str,
    spectra: Vec<NormalisedSpectrum<'a>>,
    max_len: usize,
    min_ratio: f64,
}

const RANK_MARKERS: [(Marker, &str); 4] = [
    (Marker::Circle, "elbow"),
    (Marker::Triangle, "90 % energy"),
    (Marker::Square, "99 % energy"),
    (Marker::Cross, "break-even rank"),
];

impl<'a> SpectraFigure<'a> {
    fn new(title: &'a str, spectra: &'a [SpectrumPlot<'a>]) -> Result<Self, PlotError> {
        let spectra: Vec<_> = spectra
            .iter()
            .map(|source| NormalisedSpectrum {
                source,
                raw: normalise_spectrum(source.singular_values),
                whitened: source.whitened.map(normalise_spectrum),
            })
            .collect();

        let ratios =
            spectra.iter().flat_map(|s| s.raw.iter().chain(s.whitened.iter().flatten())).flatten();
        let min_ratio = ratios.copied().fold(f64::INFINITY, f64::min);
        if !min_ratio.is_finite() {
            return Err(PlotError::NoData {
                reason: "no spectrum has a positive finite singular value",
            });
        }
        let max_len = spectra
            .iter()
            .map(|s| s.raw.len().max(s.whitened.as_ref().map_or(0, Vec::len)))
            .max()
            .unwrap_or(0);
        Ok(Self { title, spectra, max_len, min_ratio })
    }

    fn legend(&self) -> Vec<LegendEntry> {
        let mut entries: Vec<_> = self
            .spectra
            .iter()
            .take(MAX_LEGEND_SPECTRA)
            .enumerate()
            .map(|(index, s)| LegendEntry::new(s.source.name, Swatch::Line(palette(index))))
            .collect();
        if self.spectra.len() > MAX_LEGEND_SPECTRA {
            let more = self.spectra.len() - MAX_LEGEND_SPECTRA;
            entries.push(LegendEntry::new(format!("... {more} more"), Swatch::Line(WHITE)));
        }
        if self.spectra.iter().any(|s| s.whitened.is_some()) {
            entries.push(LegendEntry::new("whitened", Swatch::Dashed(BLACK)));
        }
        for (marker, label) in RANK_MARKERS {
            entries.push(LegendEntry::new(label, Swatch::Marker(marker, RGBColor(90, 90, 90))));
        }
        entries
    }
}

impl Figure for SpectraFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawFailure> {
        // Half a decade of room below the smallest value and room above 1 for the legend.
        let y_range = (self.min_ratio.min(0.1) / 3.0)..30.0;
        let x_max = (self.max_len as f64 * 1.02).max(2.0);
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, text_style(24.0))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..x_max, y_range.log_scale())?;
        chart
            .configure_mesh()
            .x_desc("index i of the singular value (rank kept)")
            .y_desc("s_i / s_0 (log scale)")
            .label_style(text_style(14.0))
            .axis_desc_style(text_style(16.0))
            .x_labels((self.max_len + 1).clamp(3, 12))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|&y| {
                // Ratios never exceed 1, so the decades above it carry no label.
                if y > 1.0 + 1e-9 {
                    String::new()
                } else {
                    format!("{y:.0e}")
                }
            })
            .light_line_style(BLACK.mix(0.05))
            .draw()?;

        for (index, spectrum) in self.spectra.iter().enumerate() {
            let color = palette(index);
            for run in contiguous_runs(&spectrum.raw) {
                draw_run(&mut chart, run, color, false)?;
            }
            for run in spectrum.whitened.iter().flat_map(|w| contiguous_runs(w)) {
                draw_run(&mut chart, run, color, true)?;
            }

            let s = spectrum.source;
            let ranks = [s.elbow, s.energy_90, s.energy_99, s.break_even];
            for (rank, (marker, _)) in ranks.into_iter().zip(RANK_MARKERS) {
                let ratio = rank.checked_sub(1).and_then(|i| spectrum.raw.get(i).copied());
                if let Some(Some(ratio)) = ratio {
                    let at = chart.backend_coord(&(rank as f64, ratio));
                    draw_marker(root, at, marker, color)?;
                }
            }
        }

        draw_legend(&chart.plotting_area().strip_coord_spec(), &self.legend(), Corner::TopRight)
    }
}

/// Draws one gap-free run of a spectrum, a lone point as a dot.
fn draw_run<DB: DrawingBackend, X, Y>(
    chart: &mut ChartContext<DB, Cartesian2d<X, Y>>,
    run: Vec<(f64, f64)>,
    color: RGBColor,
    dashed: bool,
) -> Result<(), DrawFailure>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let style = color.stroke_width(2);
    if run.len() == 1 {
        chart.draw_series([Circle::new(run[0], 3, color.filled())])?;
    } else if dashed {
        chart.draw_series(DashedLineSeries::new(run, 8, 5, style))?;
    } else {
        chart.draw_series(LineSeries::new(run, style))?;
    }
    Ok(())
}

struct InfluenceFigure<'a> {
    title: &'a str,
    influence: &'a [f64],
    angular: &'a [f64],
}

impl Figure for InfluenceFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawFailure> {
        let blocks = self.influence.len();
        let finite = self.influence.iter().chain(self.angular).copied().filter(|v| v.is_finite());
        let (low, high) = finite.fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let high = if high > 0.0 { high } else { 1.0 };
        // A third of the height above the tallest bar keeps the legend clear of the bars.
        let y_range = (low * 1.1)..(high * 1.35);
        let x_range = -0.6..(blocks as f64 - 0.4);

        let mut chart = ChartBuilder::on(root)
            .caption(self.title, text_style(24.0))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range, y_range)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(blocks.min(25))
            .x_desc("block")
            .y_desc("distance between block input and output")
            .label_style(text_style(14.0))
            .axis_desc_style(text_style(16.0))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .light_line_style(BLACK.mix(0.05))
            .draw()?;

        let (influence_color, angular_color) = (palette(0), palette(1));
        let (influence_span, angular_span) = if self.angular.is_empty() {
            ((-0.35, 0.35), (0.0, 0.0))
        } else {
            ((-0.4, 0.0), (0.0, 0.4))
        };
        chart.draw_series(bars(self.influence, influence_span, influence_color))?;
        chart.draw_series(bars(self.angular, angular_span, angular_color))?;

        let mut legend = vec![LegendEntry::new(
            "Block Influence 1 - cos(h_in, h_out)",
            Swatch::Bar(influence_color),
        )];
        if !self.angular.is_empty() {
            legend.push(LegendEntry::new(
                "angular distance arccos(cos(h_in, h_out)) / π",
                Swatch::Bar(angular_color),
            ));
        }
        draw_legend(&chart.plotting_area().strip_coord_spec(), &legend, Corner::TopRight)
    }
}

/// Bars from 0 to each finite value, spanning `index + span.0` to `index + span.1` on x.
fn bars(
    values: &[f64],
    span: (f64, f64),
    color: RGBColor,
) -> impl Iterator<Item = Rectangle<(f64, f64)>> + '_ {
    values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(move |(index, &value)| {
        let x = index as f64;
        Rectangle::new([(x + span.0, 0.0), (x + span.1, value)], color.filled())
    })
}

/// Colour scale of a heat map.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scale {
    /// Values in [0, 1], viridis.
    Unit,
    /// Values in [-1, 1], red-blue.
    Signed,
}

impl Scale {
    fn bounds(self) -> (f64, f64) {
        match self {
            Self::Unit => (0.0, 1.0),
            Self::Signed => (-1.0, 1.0),
        }
    }

    /// Colour of `value`, clamped to the scale's bounds. Non-finite values are grey.
    fn color(self, value: f64) -> RGBColor {
        if !value.is_finite() {
            return RGBColor(190, 190, 190);
        }
        let (low, high) = self.bounds();
        let t = ((value - low) / (high - low)).clamp(0.0, 1.0);
        let stops = match self {
            Self::Unit => &VIRIDIS,
            Self::Signed => &RED_BLUE,
        };
        interpolate(stops, t)
    }
}

/// Linear interpolation between equally spaced colour stops, `t` in [0, 1].
fn interpolate(stops: &[RGBColor], t: f64) -> RGBColor {
    let position = t * (stops.len() - 1) as f64;
    let index = (position.floor() as usize).min(stops.len() - 2);
    let fraction = position - index as f64;
    let (a, b) = (stops[index], stops[index + 1]);
    let channel = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * fraction).round() as u8;
    RGBColor(channel(a.0, b.0), channel(a.1, b.1), channel(a.2, b.2))
}

/// Text colour readable on `background`: white on dark colours, black on light ones.
fn contrasting_text(background: RGBColor) -> &'static RGBColor {
    let RGBColor(r, g, b) = background;
    let luma = 0.299 * r as f64 + 0.587 * g as f64 + 0.114 * b as f64;
    if luma < 128.0 {
        &WHITE
    } else {
        &BLACK
    }
}

struct SimilarityFigure<'a> {
    title: &'a str,
    matrix: &'a [Vec<f64>],
    scale: Scale,
}

impl<'a> SimilarityFigure<'a> {
    fn new(title: &'a str, matrix: &'a [Vec<f64>]) -> Self {
        let negative = matrix.iter().flatten().any(|&v| v < 0.0);
        let scale = if negative { Scale::Signed } else { Scale::Unit };
        Self { title, matrix, scale }
    }
}

impl Figure for SimilarityFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawFailure> {
        let body = root.titled(self.title, text_style(24.0))?;
        let (width, _) = body.dim_in_pixel();
        let (map_area, bar_area) = body.split_horizontally(width.saturating_sub(130));
        self.draw_map(&map_area)?;
        self.draw_colour_bar(&bar_area)
    }
}

impl SimilarityFigure<'_> {
    fn draw_map<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawFailure> {
        let blocks = self.matrix.len();
        let last = blocks as f64 - 1.0;
        let range = -0.5..(blocks as f64 - 0.5);
        let mut chart = ChartBuilder::on(area)
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(range.clone(), range)?;
        // Row 0 is drawn at the top, so y = last - row and the y labels are flipped back.
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(blocks.min(25))
            .y_labels(blocks.min(25))
            .x_desc("block")
            .y_desc("block")
            .label_style(text_style(14.0))
            .axis_desc_style(text_style(16.0))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{:.0}", last - y))
            .draw()?;

        let cells = self.matrix.iter().enumerate().flat_map(|(row, values)| {
            values.iter().enumerate().map(move |(col, &value)| (row, col, value))
        });
        let scale = self.scale;
        chart.draw_series(cells.clone().map(|(row, col, value)| {
            let (x, y) = (col as f64, last - row as f64);
            Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], scale.color(value).filled())
        }))?;

        if blocks <= MAX_ANNOTATED_BLOCKS {
            let (plot_width, _) = chart.plotting_area().dim_in_pixel();
            let font_size = (plot_width as f64 / blocks as f64 * 0.22).clamp(9.0, 18.0);
            let centred = Pos::new(HPos::Center, VPos::Center);
            chart.draw_series(cells.map(|(row, col, value)| {
                let color = contrasting_text(scale.color(value));
                let style = text_style(font_size).color(color).pos(centred);
                let text = if value.is_finite() { format!("{value:.2}") } else { "n/a".into() };
                Text::new(text, (col as f64, last - row as f64), style)
            }))?;
        }
        Ok(())
    }

    fn draw_colour_bar<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawFailure> {
        const STEPS: usize = 100;
        let (low, high) = self.scale.bounds();
        let mut chart = ChartBuilder::on(area)
            .margin_top(16)
            .margin_bottom(66)
            .margin_right(10)
            .right_y_label_area_size(60)
            .build_cartesian_2d(0.0..1.0, low..high)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(5)
            .y_desc("similarity")
            .label_style(text_style(14.0))
            .axis_desc_style(text_style(16.0))
            .y_label_formatter(&|y| format!("{y:.1}"))
            .draw()?;

        let step = (high - low) / STEPS as f64;
        chart.draw_series((0..STEPS).map(|i| {
            let y = low + step * i as f64;
            let color = self.scale.color(y + step / 2.0);
            Rectangle::new([(0.0, y), (1.0, y + step)], color.filled())
        }))?;
        chart.draw_series([Rectangle::new([(0.0, low), (1.0, high)], BLACK.stroke_width(1))])?;
        Ok(())
    }
}

/// Indices of the candidates that no other candidate beats on both size and quality, by
/// increasing size. Candidates with a non-finite quality are ignored.
fn pareto_front(candidates: &[Candidate]) -> Vec<usize> {
    let mut order: Vec<usize> =
        (0..candidates.len()).filter(|&i| candidates[i].quality.is_finite()).collect();
    // Among equal sizes the best quality comes first, so only it can join the front.
    order.sort_by(|&a, &b| {
        let (a, b) = (&candidates[a], &candidates[b]);
        a.bytes.cmp(&b.bytes).then(b.quality.total_cmp(&a.quality))
    });
    let mut front = Vec::new();
    let mut best = f64::NEG_INFINITY;
    for index in order {
        if candidates[index].quality > best {
            best = candidates[index].quality;
            front.push(index);
        }
    }
    front
}

/// Pads a value range by `fraction` of its span, or of the value when the span is 0.
fn padded(low: f64, high: f64, fraction: f64) -> (f64, f64) {
    let span = high - low;
    let pad = if span > 0.0 {
        span * fraction
    } else if low != 0.0 {
        low.abs() * fraction
    } else {
        1.0
    };
    (low - pad, high + pad)
}

/// Decimals that tell apart axis labels about a tenth of `span` apart.
fn label_decimals(span: f64) -> usize {
    if !(span > 0.0 && span.is_finite()) {
        return 1;
    }
    let step = span / 10.0;
    (-step.log10().floor()).clamp(0.0, 15.0) as usize
}

fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

struct SizeQualityFigure<'a> {
    title: &'a str,
    candidates: &'a [Candidate<'a>],
    floor: Option<f64>,
}

impl SizeQualityFigure<'_> {
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let max_mb = self.candidates.iter().map(|c| megabytes(c.bytes)).fold(0.0, f64::max);
        let x_high = if max_mb > 0.0 { max_mb * 1.15 } else { 1.0 };

        let qualities = self.candidates.iter().map(|c| c.quality).chain(self.floor);
        let finite = qualities.filter(|q| q.is_finite());
        let (low, high) =
            finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), q| (lo.min(q), hi.max(q)));
        let y_range = if low <= high { padded(low, high, 0.12) } else { (0.0, 1.0) };
        ((0.0, x_high), y_range)
    }

    fn legend(&self) -> Vec<LegendEntry> {
        let mut legend = vec![
            LegendEntry::new("candidate", Swatch::Marker(Marker::Circle, palette(0))),
            LegendEntry::new("Pareto front", Swatch::Line(palette(7))),
        ];
        if let Some(chosen) = self.candidates.iter().find(|c| c.chosen) {
            let label = format!("chosen: {}", chosen.label);
            legend.push(LegendEntry::new(label, Swatch::Marker(Marker::Diamond, palette(3))));
        }
        if let Some(floor) = self.floor {
            let label = format!("quality floor {floor:.3}");
            legend.push(LegendEntry::new(label, Swatch::Dashed(palette(3))));
        }
        legend
    }
}

impl Figure for SizeQualityFigure<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> Result<(), DrawFailure> {
        let ((x_low, x_high), (y_low, y_high)) = self.ranges();
        let x_decimals = label_decimals(x_high - x_low);
        let y_decimals = label_decimals(y_high - y_low);
        let mut chart = ChartBuilder::on(root)
            .caption(self.title, text_style(24.0))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(80)
            .build_cartesian_2d(x_low..x_high, y_low..y_high)?;
        chart
            .configure_mesh()
            .x_desc("model size (MB, 10^6 bytes)")
            .y_desc("retained quality")
            .label_style(text_style(14.0))
            .axis_desc_style(text_style(16.0))
            .x_label_formatter(&|x| format!("{x:.x_decimals$}"))
            .y_label_formatter(&|y| format!("{y:.y_decimals$}"))
            .light_line_style(BLACK.mix(0.05))
            .draw()?;

        if let Some(floor) = self.floor {
            let line = [(x_low, floor), (x_high, floor)];
            chart.draw_series(DashedLineSeries::new(line, 10, 6, palette(3).stroke_width(2)))?;
        }
        let front = pareto_front(self.candidates);
        let front_points = front.iter().map(|&i| {
            let c = &self.candidates[i];
            (megabytes(c.bytes), c.quality)
        });
        chart.draw_series(LineSeries::new(front_points, palette(7).stroke_width(2)))?;

        let label_style = text_style(12.0).pos(Pos::new(HPos::Left, VPos::Bottom));
        let plotted = self.candidates.iter().filter(|c| c.quality.is_finite());
        for candidate in
            plotted.clone().filter(|c| !c.chosen).chain(plotted.clone().filter(|c| c.chosen))
        {
            let at = chart.backend_coord(&(megabytes(candidate.bytes), candidate.quality));
            if candidate.chosen {
                draw_marker(root, at, Marker::Diamond, palette(3))?;
            } else {
                draw_marker(root, at, Marker::Circle, palette(0))?;
            }
            if self.candidates.len() <= MAX_LABELLED_CANDIDATES {
                let text_at = (at.0 + 8, at.1 - 6);
                root.draw(&Text::new(candidate.label.to_owned(), text_at, label_style.clone()))?;
            }
        }

        let legend = self.legend();
        draw_legend(&chart.plotting_area().strip_coord_spec(), &legend, Corner::BottomRight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

    /// A directory under the system temp directory, removed when dropped unless
    /// `EDGEFOLD_PLOT_DIR` names a directory to keep the plots in.
    struct OutputDir {
        path: PathBuf,
        keep: bool,
    }

    impl OutputDir {
        fn new(test: &str) -> Self {
            if let Some(dir) = std::env::var_os("EDGEFOLD_PLOT_DIR") {
                return Self { path: PathBuf::from(dir), keep: true };
            }
            let name = format!("edgefold-plots-{}-{test}", std::process::id());
            let path = std::env::temp_dir().join(name);
            let _ = fs::remove_dir_all(&path);
            Self { path, keep: false }
        }
    }

    impl Drop for OutputDir {
        fn drop(&mut self) {
            if !self.keep {
                let _ = fs::remove_dir_all(&self.path);
            }
        }
    }

    fn assert_written(paths: &[PathBuf; 2], title: &str) {
        let png = fs::read(&paths[0]).unwrap();
        assert!(png.len() > 1000, "{} has only {} bytes", paths[0].display(), png.len());
        assert_eq!(png[..8], PNG_SIGNATURE, "{} is not a PNG", paths[0].display());
        let svg = fs::read_to_string(&paths[1]).unwrap();
        assert!(svg.starts_with("<svg"), "{} is not an SVG", paths[1].display());
        assert!(svg.contains(title), "{} lacks the title {title:?}", paths[1].display());
    }

    /// Checks whether a text element of the SVG contains exactly `text`. plotters writes each text on a
    /// line of its own between the tags.
    fn has_text_line(svg: &str, text: &str) -> bool {
        svg.lines().any(|line| line == text)
    }

    /// Returns a decaying spectrum with `len` values, s_i = 10 decay^i + 0.01.
    fn spectrum(len: usize, decay: f64) -> Vec<f64> {
        (0..len).map(|i| 10.0 * decay.powi(i as i32) + 0.01).collect()
    }

    fn similarity(blocks: usize) -> Vec<Vec<f64>> {
        (0..blocks)
            .map(|i| (0..blocks).map(|j| 1.0 / (1.0 + i.abs_diff(j) as f64)).collect())
            .collect()
    }

    fn candidates() -> Vec<Candidate<'static>> {
        vec![
            Candidate { label: "f32", bytes: 90_000_000, quality: 1.0, chosen: false },
            Candidate { label: "f16", bytes: 45_000_000, quality: 0.999, chosen: false },
            Candidate { label: "int8", bytes: 23_000_000, quality: 0.985, chosen: true },
            Candidate { label: "int4 g64", bytes: 12_500_000, quality: 0.94, chosen: false },
            Candidate { label: "int8 drop 1", bytes: 19_500_000, quality: 0.91, chosen: false },
            Candidate { label: "int8 drop 2", bytes: 16_000_000, quality: 0.86, chosen: false },
            Candidate { label: "f16 drop 1", bytes: 38_000_000, quality: 0.92, chosen: false },
        ]
    }

    #[test]
    fn spectra_written() {
        let dir = OutputDir::new("spectra");
        let (attention, mlp, whitened) =
            (spectrum(64, 0.93), spectrum(48, 0.8), spectrum(64, 0.85));
        let spectra = [
            SpectrumPlot {
                name: "attention.q",
                singular_values: &attention,
                whitened: Some(&whitened),
                elbow: 20,
                energy_90: 14,
                energy_99: 30,
                break_even: 32,
            },
            SpectrumPlot {
                name: "mlp.up",
                singular_values: &mlp,
                whitened: None,
                elbow: 9,
                energy_90: 5,
                energy_99: 10,
                break_even: 24,
            },
        ];
        let title = "Singular spectra of block 0";
        let paths = plot_spectra(&dir.path, "spectra", title, &spectra).unwrap();
        assert_eq!(paths[0], dir.path.join("spectra.png"));
        assert_eq!(paths[1], dir.path.join("spectra.svg"));
        assert_written(&paths, title);
    }

    #[test]
    fn block_influence_written() {
        let dir = OutputDir::new("influence");
        let influence = [0.42f64, 0.08, 0.05, 0.11, 0.03, 0.37];
        let angular: Vec<f64> =
            influence.iter().map(|bi| (1.0 - bi).acos() / std::f64::consts::PI).collect();
        let title = "Block Influence of six blocks";
        let paths = plot_block_influence(&dir.path, "influence", title, &influence, &angular);
        assert_written(&paths.unwrap(), title);
    }

    #[test]
    fn similarity_written_with_cell_values() {
        let dir = OutputDir::new("similarity");
        let title = "Cosine similarity of block outputs";
        let paths = plot_similarity(&dir.path, "similarity", title, &similarity(6)).unwrap();
        assert_written(&paths, title);
        let svg = fs::read_to_string(&paths[1]).unwrap();
        // 1 / (1 + 2) printed in the cells two blocks off the diagonal.
        assert!(has_text_line(&svg, "0.33"), "cell values missing from the SVG");
    }

    #[test]
    fn similarity_large_omits_cell_values() {
        let dir = OutputDir::new("similarity-large");
        let title = "Similarity of 13 blocks";
        let paths = plot_similarity(&dir.path, "similarity_large", title, &similarity(13)).unwrap();
        assert_written(&paths, title);
        let svg = fs::read_to_string(&paths[1]).unwrap();
        assert!(!has_text_line(&svg, "0.33"), "a 13 x 13 matrix must not print cell values");
    }

    #[test]
    fn similarity_signed_and_nan() {
        let dir = OutputDir::new("similarity-signed");
        let matrix = vec![vec![1.0, -0.5, f64::NAN], vec![-0.5, 1.0, 0.2], vec![0.3, 0.2, 2.0]];
        let title = "Signed similarity";
        let paths = plot_similarity(&dir.path, "signed", title, &matrix).unwrap();
        assert_written(&paths, title);
        let svg = fs::read_to_string(&paths[1]).unwrap();
        assert!(has_text_line(&svg, "n/a"), "a NaN cell must be marked");
        assert!(has_text_line(&svg, "-0.50"), "negative cell values missing");
    }

    #[test]
    fn size_quality_written() {
        let dir = OutputDir::new("size-quality");
        let title = "Size against quality of the planned candidates";
        let paths =
            plot_size_quality(&dir.path, "size_quality", title, &candidates(), Some(0.9)).unwrap();
        assert_written(&paths, title);
        let svg = fs::read_to_string(&paths[1]).unwrap();
        assert!(has_text_line(&svg, "chosen: int8"), "the chosen candidate is not in the legend");
        assert!(has_text_line(&svg, "int4 g64"), "candidate labels missing");
    }

    #[test]
    fn plots_without_font() {
        let dir = OutputDir::new("no-font");
        let values = spectrum(16, 0.7);
        let spectra = [SpectrumPlot {
            name: "w",
            singular_values: &values,
            whitened: Some(&values),
            elbow: 4,
            energy_90: 3,
            energy_99: 6,
            break_even: 8,
        }];
        let influence = [0.1, 0.2, f64::NAN];
        let matrix = similarity(4);
        let candidates = candidates();
        let title = "Drawn without a font";
        type WriteFigure<'a> = &'a dyn Fn(&str) -> Result<[PathBuf; 2], PlotError>;
        let figures: [(&str, WriteFigure); 4] = [
            ("spectra", &|stem| {
                let figure = SpectraFigure::new(title, &spectra)?;
                write_figure_with_font(&dir.path, stem, WIDE_SIZE, &figure, false)
            }),
            ("influence", &|stem| {
                let figure = InfluenceFigure { title, influence: &influence, angular: &[] };
                write_figure_with_font(&dir.path, stem, WIDE_SIZE, &figure, false)
            }),
            ("similarity", &|stem| {
                let figure = SimilarityFigure::new(title, &matrix);
                write_figure_with_font(&dir.path, stem, HEAT_MAP_SIZE, &figure, false)
            }),
            ("size_quality", &|stem| {
                let figure = SizeQualityFigure { title, candidates: &candidates, floor: None };
                write_figure_with_font(&dir.path, stem, WIDE_SIZE, &figure, false)
            }),
        ];
        for (name, write) in figures {
            let stem = format!("no_font_{name}");
            let paths = write(&stem).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_written(&paths, title);
        }
    }

    #[test]
    fn spectra_degenerate_inputs() {
        let dir = OutputDir::new("spectra-degenerate");
        let base = SpectrumPlot {
            name: "m",
            singular_values: &[],
            whitened: None,
            elbow: 0,
            energy_90: 0,
            energy_99: 0,
            break_even: 0,
        };

        let error = plot_spectra(&dir.path, "empty", "t", &[]).unwrap_err();
        assert!(matches!(error, PlotError::NoData { .. }), "empty list: {error}");
        let error = plot_spectra(&dir.path, "no_values", "t", &[base]).unwrap_err();
        assert!(matches!(error, PlotError::NoData { .. }), "no values: {error}");
        let zeros = [0.0; 5];
        let all_zero = SpectrumPlot { singular_values: &zeros, elbow: 2, ..base };
        let error = plot_spectra(&dir.path, "zeros", "t", &[all_zero]).unwrap_err();
        assert!(matches!(error, PlotError::NoData { .. }), "all zero: {error}");

        // Zeros, NaN and infinity leave gaps, and out-of-range ranks are not marked.
        let gappy = [5.0, 3.0, 0.0, f64::NAN, 1.0, 0.5, f64::INFINITY, 0.0, 1e-310];
        let single = [2.0];
        let tiny = [1.0, 1e-8, 1e-17, 1e-300, f64::MIN_POSITIVE / 8.0];
        let cases = [
            ("gaps", SpectrumPlot { singular_values: &gappy, elbow: 3, break_even: 99, ..base }),
            (
                "one_value",
                SpectrumPlot { singular_values: &single, elbow: 1, energy_90: 1, ..base },
            ),
            ("whitened_only", SpectrumPlot { whitened: Some(&gappy), ..base }),
            ("tiny_ratios", SpectrumPlot { singular_values: &tiny, elbow: 4, ..base }),
        ];
        for (stem, case) in cases {
            let paths =
                plot_spectra(&dir.path, &format!("spectra_{stem}"), stem, &[case, all_zero]);
            let paths = paths.unwrap_or_else(|e| panic!("{stem}: {e}"));
            assert_written(&paths, stem);
        }
    }

    #[test]
    fn block_influence_degenerate_inputs() {
        let dir = OutputDir::new("influence-degenerate");
        let error = plot_block_influence(&dir.path, "empty", "t", &[], &[]).unwrap_err();
        assert!(matches!(error, PlotError::NoData { .. }), "empty: {error}");
        let error = plot_block_influence(&dir.path, "short", "t", &[0.1, 0.2], &[0.1]).unwrap_err();
        assert!(
            matches!(error, PlotError::LengthMismatch { influence: 2, angular: 1 }),
            "mismatch: {error}"
        );

        let cases: [(&str, &[f64], &[f64]); 5] = [
            ("one_block", &[0.25], &[0.2]),
            ("no_angular", &[0.25, 0.1, 0.3], &[]),
            ("nan", &[f64::NAN, 0.1, f64::INFINITY], &[0.2, f64::NAN, 0.1]),
            ("all_nan", &[f64::NAN, f64::NAN], &[f64::NAN, f64::NAN]),
            ("zero_and_negative", &[0.0, -0.2, 0.0], &[0.0, 0.0, 0.0]),
        ];
        for (stem, influence, angular) in cases {
            let file_stem = format!("influence_{stem}");
            let paths = plot_block_influence(&dir.path, &file_stem, stem, influence, angular);
            assert_written(&paths.unwrap_or_else(|e| panic!("{stem}: {e}")), stem);
        }
    }

    #[test]
    fn similarity_degenerate_inputs() {
        let dir = OutputDir::new("similarity-degenerate");
        let error = plot_similarity(&dir.path, "empty", "t", &[]).unwrap_err();
        assert!(matches!(error, PlotError::NoData { .. }), "empty: {error}");
        let ragged = vec![vec![1.0, 0.5], vec![0.5]];
        let error = plot_similarity(&dir.path, "ragged", "t", &ragged).unwrap_err();
        assert!(
            matches!(error, PlotError::NotSquare { row: 1, len: 1, expected: 2 }),
            "ragged: {error}"
        );
        let wide = vec![vec![1.0, 0.5, 0.2]];
        let error = plot_similarity(&dir.path, "wide", "t", &wide).unwrap_err();
        assert!(matches!(error, PlotError::NotSquare { row: 0, .. }), "wide: {error}");

        let cases = [
            ("one_block", vec![vec![1.0]]),
            ("all_nan", vec![vec![f64::NAN; 2]; 2]),
            ("infinite", vec![vec![f64::INFINITY, f64::NEG_INFINITY], vec![0.0, 1.0]]),
        ];
        for (stem, matrix) in cases {
            let paths = plot_similarity(&dir.path, &format!("similarity_{stem}"), stem, &matrix);
            assert_written(&paths.unwrap_or_else(|e| panic!("{stem}: {e}")), stem);
        }
    }

    #[test]
    fn size_quality_degenerate_inputs() {
        let dir = OutputDir::new("size-quality-degenerate");
        let error = plot_size_quality(&dir.path, "empty", "t", &[], Some(0.9)).unwrap_err();
        assert!(matches!(error, PlotError::NoData { .. }), "empty: {error}");

        let single = [Candidate { label: "only", bytes: 1_000_000, quality: 0.95, chosen: true }];
        let zero = [Candidate { label: "zero", bytes: 0, quality: 0.0, chosen: false }];
        let nan = [
            Candidate { label: "nan", bytes: 5_000_000, quality: f64::NAN, chosen: true },
            Candidate { label: "ok", bytes: 2_000_000, quality: 0.8, chosen: false },
        ];
        let all_nan = [Candidate { label: "nan", bytes: 5, quality: f64::NAN, chosen: false }];
        let cases: [(&str, &[Candidate], Option<f64>); 5] = [
            ("one", &single, Some(0.9)),
            ("zero", &zero, None),
            ("nan", &nan, Some(f64::NAN)),
            ("all_nan", &all_nan, None),
            ("floor_only", &all_nan, Some(0.9)),
        ];
        for (stem, candidates, floor) in cases {
            let file_stem = format!("size_quality_{stem}");
            let paths = plot_size_quality(&dir.path, &file_stem, stem, candidates, floor);
            assert_written(&paths.unwrap_or_else(|e| panic!("{stem}: {e}")), stem);
        }
    }

    #[test]
    fn invalid_stems_rejected() {
        let dir = OutputDir::new("stems");
        for stem in ["", ".", "..", "a/b", "../up", "a\\b"] {
            let error = plot_block_influence(&dir.path, stem, "t", &[0.1], &[]).unwrap_err();
            assert!(matches!(error, PlotError::InvalidStem { .. }), "{stem:?}: {error}");
        }
    }

    #[test]
    fn spectrum_normalised_by_largest() {
        let ratios = normalise_spectrum(&[4.0, 2.0, 0.0, f64::NAN, -1.0, 1.0]);
        assert_eq!(ratios, [Some(1.0), Some(0.5), None, None, None, Some(0.25)]);
        assert_eq!(normalise_spectrum(&[0.0, 0.0]), [None, None]);
        assert_eq!(normalise_spectrum(&[f64::INFINITY, 1.0]), [None, Some(1.0)]);
        assert_eq!(normalise_spectrum(&[1.0, 1e-17, 1e-19]), [Some(1.0), Some(1e-17), None]);
    }

    #[test]
    fn runs_split_at_gaps() {
        let runs = contiguous_runs(&[Some(1.0), Some(0.5), None, Some(0.2), None, None]);
        assert_eq!(runs, [vec![(1.0, 1.0), (2.0, 0.5)], vec![(4.0, 0.2)]]);
        assert!(contiguous_runs(&[None, None]).is_empty());
    }

    #[test]
    fn pareto_front_of_candidates() {
        // By size: int4 (0.94), int8 drop 2 (0.86), int8 drop 1 (0.91), int8 (0.985),
        // f16 drop 1 (0.92), f16 (0.999), f32 (1.0).
        let front = pareto_front(&candidates());
        let labels: Vec<_> = front.iter().map(|&i| candidates()[i].label).collect();
        assert_eq!(labels, ["int4 g64", "int8", "f16", "f32"]);

        let tied = [
            Candidate { label: "worse", bytes: 10, quality: 0.5, chosen: false },
            Candidate { label: "better", bytes: 10, quality: 0.7, chosen: false },
            Candidate { label: "nan", bytes: 1, quality: f64::NAN, chosen: false },
        ];
        assert_eq!(pareto_front(&tied), [1]);
    }

    #[test]
    fn label_decimals_follow_span() {
        assert_eq!(label_decimals(100.0), 0);
        assert_eq!(label_decimals(10.0), 0);
        assert_eq!(label_decimals(0.16), 2);
        assert_eq!(label_decimals(0.0004), 5);
        assert_eq!(label_decimals(0.0), 1);
        assert_eq!(label_decimals(f64::NAN), 1);
    }

    #[test]
    fn colour_scales_hit_stops() {
        assert_eq!(Scale::Unit.color(0.0), VIRIDIS[0]);
        assert_eq!(Scale::Unit.color(1.0), VIRIDIS[4]);
        assert_eq!(Scale::Unit.color(0.5), VIRIDIS[2]);
        assert_eq!(Scale::Unit.color(7.0), VIRIDIS[4], "values above 1 are clamped");
        assert_eq!(Scale::Signed.color(0.0), RED_BLUE[2]);
        assert_eq!(Scale::Signed.color(-1.0), RED_BLUE[0]);
        assert_eq!(Scale::Signed.color(f64::NEG_INFINITY), RGBColor(190, 190, 190));
        // Halfway between the first two viridis stops.
        assert_eq!(interpolate(&VIRIDIS, 0.125), RGBColor(64, 42, 112));
    }
}
